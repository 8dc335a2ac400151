"""NT-Xent over real gloo process groups (2 and 3 processes) equals one process on the concatenated batch.

The parent spawns one subprocess per rank running this file as a script; each rank runs every scenario
and saves its results, and the tests compare them with single-process runs on the global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from medssl_scale.losses import nt_xent

F64 = torch.float64
B, D, D_IN = 5, 8, 6
TAU = 0.2
WORKER_TIMEOUT_S = 120


def embedding_scenarios(world: int) -> dict:
    """name -> (z1, z2, patient, valid, exclude_same_patient, chunk_size), global batches of B * world."""
    g = torch.Generator().manual_seed(100 + world)
    n = B * world
    z1 = torch.randn(n, D, generator=g, dtype=F64)
    z2 = z1 + 0.8 * torch.randn(n, D, generator=g, dtype=F64)
    # Patients repeat within and across ranks (ids < n/2); the last rank ends in two padding entries and,
    # with three ranks, the middle rank is entirely padding (an epoch's tail).
    patient = torch.randint(0, max(2, n // 2), (n,), generator=g) * 1_000_003 + 2**61
    valid = torch.ones(n, dtype=torch.bool)
    valid[-2:] = False
    if world == 3:
        valid[B:2 * B] = False
    patient[~valid] = -1
    all_valid = torch.ones(n, dtype=torch.bool)
    return {
        "plain": (z1, z2, None, None, False, None),
        "plain_chunked": (z1, z2, None, all_valid, False, 3),
        "padded_same_patient": (z1, z2, patient, valid, True, None),
        "padded_same_patient_chunked": (z1, z2, patient, valid, True, 4),
        "padded_no_mask_chunked": (z1, z2, patient, valid, False, 7),
    }


def model_case(world: int):
    """A small float64 linear model and a global batch of inputs, patients and validity."""
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Linear(D_IN, D, dtype=F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(D, D_IN, generator=g, dtype=F64))
        model.bias.copy_(torch.randn(D, generator=g, dtype=F64))
    n = B * world
    x1 = torch.randn(n, D_IN, generator=g, dtype=F64)
    x2 = x1 + 0.5 * torch.randn(n, D_IN, generator=g, dtype=F64)
    patient = torch.tensor([i % 4 for i in range(n)])
    valid = torch.ones(n, dtype=torch.bool)
    valid[B - 1] = False          # one padding entry on rank 0
    return model, x1, x2, patient, valid


def run_rank(rank: int, world: int, out_dir: str) -> None:
    """One rank: every scenario on its slice of the global batch; results saved for the parent."""
    import torch.distributed as dist

    from medssl_scale.distributed.gather import all_reduce_sum

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    rows = slice(rank * B, (rank + 1) * B)
    results = {}
    for name, (z1, z2, patient, valid, exclude, chunk) in embedding_scenarios(world).items():
        a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
        out = nt_xent(a, b, TAU, patient=None if patient is None else patient[rows],
                      valid=None if valid is None else valid[rows], exclude_same_patient=exclude,
                      chunk_size=chunk)
        out.loss.backward()
        results[name] = {"loss": out.loss.detach(), "global_loss": out.global_loss, "accuracy": out.accuracy,
                         "num_valid": out.num_valid, "g1": a.grad, "g2": b.grad}
    for chunk in (None, 2):
        model, x1, x2, patient, valid = model_case(world)
        out = nt_xent(model(x1[rows]), model(x2[rows]), TAU, patient=patient[rows], valid=valid[rows],
                      exclude_same_patient=True, chunk_size=chunk)
        out.loss.backward()
        # What DDP/DeepSpeed do with parameter gradients: average over ranks.
        results[f"model_{chunk}"] = {name: all_reduce_sum(p.grad) / world for name, p in model.named_parameters()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out_dir: Path) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=WORKER_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world}-process gloo run hung for more than {WORKER_TIMEOUT_S}s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def dist_run(request, tmp_path_factory):
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"gloo{world}"))


def _close(a, b):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("world", [2, 3])
def test_scenarios_exercise_cross_rank_patients(world):
    """Guards the scenarios themselves: valid patients shared by two ranks, and a mask that matters."""
    z1, z2, patient, valid, _, _ = embedding_scenarios(world)["padded_same_patient"]
    ranks_of = {}
    for i in range(B * world):
        if valid[i]:
            ranks_of.setdefault(int(patient[i]), set()).add(i // B)
    assert any(len(r) > 1 for r in ranks_of.values())
    masked = nt_xent(z1, z2, TAU, patient=patient, valid=valid, exclude_same_patient=True).loss
    plain = nt_xent(z1, z2, TAU, patient=patient, valid=valid).loss
    assert abs(masked.item() - plain.item()) > 1e-3


@pytest.mark.parametrize("name", list(embedding_scenarios(2)))
def test_loss_and_embedding_grads_match_single_process(dist_run, name):
    world, ranks = dist_run
    z1, z2, patient, valid, exclude, chunk = embedding_scenarios(world)[name]
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    single = nt_xent(a, b, TAU, patient=patient, valid=valid, exclude_same_patient=exclude)
    single.loss.backward()
    for r, res in enumerate(ranks):
        got = res[name]
        _close(got["global_loss"], single.loss.detach())
        _close(got["accuracy"], single.accuracy)
        assert got["num_valid"].item() == single.num_valid.item()
        # Each rank's embedding gradient is that of the sum of all ranks' losses; after DDP's 1/R
        # averaging of the resulting parameter gradients it is the single-process gradient.
        rows = slice(r * B, (r + 1) * B)
        _close(got["g1"] / world, a.grad[rows])
        _close(got["g2"] / world, b.grad[rows])
    _close(sum(res[name]["loss"] for res in ranks) / world, single.loss.detach())


@pytest.mark.parametrize("chunk", [None, 2])
def test_averaged_parameter_grads_match_single_process(dist_run, chunk):
    world, ranks = dist_run
    model, x1, x2, patient, valid = model_case(world)
    single = nt_xent(model(x1), model(x2), TAU, patient=patient, valid=valid, exclude_same_patient=True)
    single.loss.backward()
    for res in ranks:
        for name, p in model.named_parameters():
            _close(res[f"model_{chunk}"][name], p.grad)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
