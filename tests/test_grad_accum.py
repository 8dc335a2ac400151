"""Contrastive gradient accumulation keeps the whole global batch's negatives, exactly (CPU).

ContrastiveStep takes one optimizer step of SGD over 2 micro-batches in 1 and 2 gloo processes, driven by
a real DeepSpeed engine (float32: DeepSpeed reduces no float64 gradients) and by a plain-torch engine of
the same contract (float64: backward sums micro-batch gradients, the boundary step averages over ranks).
The reference, in one plain-torch process, embeds each micro-batch (of all ranks) with its own batch
statistics, computes ONE NT-Xent over every embedding and backpropagates. With no BatchNorm the
reference is also simply the whole global batch in one forward.
"""

import copy
import multiprocessing
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from medssl_scale.config import load_config
from medssl_scale.data.batch import PairBatch
from medssl_scale.losses.ntxent import nt_xent

MICRO, ACCUM, DIM = 3, 2, 6
LR = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Net(nn.Module):
    """(B, 4) -> (features, embeddings), like ContrastiveModel."""

    def __init__(self, bn: bool):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.ReLU(),
                                  nn.Linear(8, DIM))

    def forward(self, x):
        z = self.body(x)
        return z, z


def _net(bn: bool, dtype=torch.float64) -> _Net:
    torch.manual_seed(0)
    return _Net(bn).to(dtype)


def _data(world: int, dtype=torch.float64):
    """views (world, ACCUM, MICRO, 4) x 2, patients, validity (the last micro-batch of rank 0 padded)."""
    g = torch.Generator().manual_seed(4)
    v1 = torch.randn(world, ACCUM, MICRO, 4, generator=g, dtype=torch.float64)
    v2 = (v1 + 0.3 * torch.randn(world, ACCUM, MICRO, 4, generator=g, dtype=torch.float64)).to(dtype)
    v1 = v1.to(dtype)
    patient = torch.arange(world * ACCUM * MICRO).view(world, ACCUM, MICRO) // 2  # pairs share patients
    valid = torch.ones(world, ACCUM, MICRO, dtype=torch.bool)
    valid[0, -1, -1] = False
    v1[~valid], v2[~valid] = 0.0, 0.0
    patient = torch.where(valid, patient, torch.full_like(patient, -1))
    return v1, v2, patient, valid


def _reference(bn: bool, world: int) -> dict:
    """Weights after one SGD step on the one-loss-over-all-micro-batches gradient, in one process."""
    net = _net(bn)
    v1, v2, patient, valid = _data(world)
    z1s, z2s, pats, oks = [], [], [], []
    for m in range(ACCUM):
        # Global BN over ranks = plain BN over the micro-batch of every rank, valid rows only.
        a, b, ok = v1[:, m].reshape(-1, 4), v2[:, m].reshape(-1, 4), valid[:, m].reshape(-1)
        _, z = net(torch.cat([a[ok], b[ok]]))
        z1, z2 = z.chunk(2)
        z1s.append(z1), z2s.append(z2), pats.append(patient[:, m].reshape(-1)[ok])
    out = nt_xent(torch.cat(z1s), torch.cat(z2s), 0.2, patient=torch.cat(pats), exclude_same_patient=True)
    out.loss.backward()
    with torch.no_grad():
        return {k: p - LR * p.grad for k, p in net.named_parameters()}, float(out.global_loss)


def _reference_one_big_batch(world: int):
    """Without BN the micro-batches' forwards are the big batch's: one forward of everything."""
    net = _net(False)
    v1, v2, patient, valid = _data(world)
    ok = valid.reshape(-1)
    _, z = net(torch.cat([v1.reshape(-1, 4)[ok], v2.reshape(-1, 4)[ok]]))
    out = nt_xent(*z.chunk(2), 0.2, patient=patient.reshape(-1)[ok], exclude_same_patient=True)
    out.loss.backward()
    with torch.no_grad():
        return {k: p - LR * p.grad for k, p in net.named_parameters()}, float(out.global_loss)


class _TorchEngine:
    """The engine contract ContrastiveStep relies on, in plain torch (float64 capable): backward adds
    gradients (no 1/accum scaling with scale_wrt_gas=False); the ACCUM-th step() averages them over ranks,
    steps the optimizer and zeroes them, as DeepSpeed does at the accumulation boundary."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer, self.micro = module, optimizer, 0

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss, scale_wrt_gas=True):
        (loss / ACCUM if scale_wrt_gas else loss).backward()

    def step(self):
        import torch.distributed as dist

        self.micro += 1
        if self.micro % ACCUM:
            return
        for p in self.module.parameters():
            if p.grad is not None and dist.is_initialized():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.optimizer.step()
        self.optimizer.zero_grad()


def _worker(rank: int, world: int, port: int, engine_kind: str, references: dict) -> None:
    """Both models (without and with BatchNorm), one after the other, in one process group: one start-up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=timedelta(seconds=120),
                               verbose=False)
    for bn, expected in references.items():
        _check(rank, world, bn, engine_kind, expected)


def _check(rank: int, world: int, bn: bool, engine_kind: str, references) -> None:
    import deepspeed

    from medssl_scale.distributed.batchnorm import convert_to_masked_bn, make_global_bn
    from medssl_scale.train.step import ContrastiveStep

    dtype = torch.float64 if engine_kind == "torch" else torch.float32
    net = _net(bn, dtype)
    net = make_global_bn(net, "cpu") if world > 1 else convert_to_masked_bn(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    if engine_kind == "torch":
        engine = _TorchEngine(net, optimizer)
        tol = dict(rtol=0, atol=1e-12)
    else:
        ds = {"train_batch_size": MICRO * ACCUM * world, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_accumulation_steps": ACCUM, "gradient_clipping": 0.0, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=ds)
        tol = dict(rtol=0, atol=2e-6)
    cfg = load_config(None, ["loss.temperature=0.2", "loss.exclude_same_patient=true"])
    v1, v2, patient, valid = _data(world, dtype)
    batches = [PairBatch(view1=v1[rank, m], view2=v2[rank, m], patient=patient[rank, m], valid=valid[rank, m],
                         keys=[], epoch=0, step=m) for m in range(ACCUM)]
    loss, _ = ContrastiveStep(engine, cfg, torch.device("cpu"))(batches)
    for expected, ref_loss in references:
        assert loss == pytest.approx(ref_loss, rel=tol["atol"])
        for k, p in engine.module.named_parameters():
            torch.testing.assert_close(p.detach().double(), expected[k], **tol, msg=k)
    bns = [m for m in engine.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == int(bn)  # the one BN of _Net(bn=True), converted (so the count below is not vacuous)
    assert all(int(m.num_batches_tracked) == ACCUM for m in bns)  # once per micro-batch, not twice


# The real engine at 2 processes; the plain one also at 1. Each checks the model without BatchNorm, then the
# one with BatchNorm, in the same processes (start-up, DeepSpeed's import above all, is most of the cost).
@pytest.mark.parametrize("world,engine_kind", [(1, "torch"), (2, "torch"), (2, "deepspeed")])
def test_accumulated_step_equals_one_loss_over_the_global_batch(world, engine_kind):
    references = {bn: [_reference(bn, world)] + ([_reference_one_big_batch(world)] if not bn else [])
                  for bn in (False, True)}
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])
    mp.start_processes(_worker, args=(world, _free_port(), engine_kind, references), nprocs=world,
                       join=True, start_method="forkserver")


def test_micro_batch_losses_alone_would_differ():
    """The bug this replaces: a mean of per-micro-batch NT-Xent losses is another objective."""
    net = _net(False)
    v1, v2, patient, valid = _data(1)
    per_micro = []
    for m in range(ACCUM):
        ok = valid[0, m]
        _, z = net(torch.cat([v1[0, m][ok], v2[0, m][ok]]))
        per_micro.append(float(nt_xent(*z.chunk(2), 0.2, patient=patient[0, m][ok], exclude_same_patient=True).global_loss))
    _, whole = _reference_one_big_batch(1)
    assert abs(sum(per_micro) / ACCUM - whole) > 1e-3
