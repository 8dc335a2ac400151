"""Resuming and exporting the way clusters do it: shards moved, loader workers and launcher changed between
runs, a finished run extended, and ZeRO-3 across two nodes with checkpoints on object storage.

The runs compared with come from conftest's session fixtures, shared with test_train.py: `reference` (8
steps), the 5-step torchrun run and the one-node ZeRO-3 run (`pretrain_run`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from shardtools import REPO
from trainrun import ADAMW, FAST, FIVE_STEPS, REFERENCE, VENV_BIN, env, free_port, losses, run

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def shards(sample_shards):
    return sample_shards


def test_extend_a_finished_run_after_moving_the_shards_and_adding_workers(reference, pretrain_run, shards, tmp_path):
    """A finished 5-step run extended to 8 steps is the 8-step reference exactly: its 5 steps are all warmup,
    whose learning rates do not depend on the run's length, and the extension recomputes the schedule (the
    cosine decay) for 8. The finished run is the shared torchrun one: the checkpoint is the launcher's own."""
    run_dir = tmp_path / "run"
    shutil.copytree(pretrain_run("torchrun", *FIVE_STEPS), run_dir)  # a copy: the shared run stays as it was
    moved = tmp_path / "elsewhere" / "shards"
    shutil.copytree(shards, moved)
    # Asking for more steps without saying so is refused in one line, naming the key that allows it.
    proc = run("python", run_dir, moved, *REFERENCE, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "train.extend=true" in errors[0], proc.stderr[-2000:]
    # The shards now live elsewhere, the loader has a worker process, and deepspeed (not torchrun) launches:
    # none of these changes the result.
    proc = run("deepspeed", run_dir, moved, *REFERENCE, "train.extend=true", "data.workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 5" in proc.stdout + proc.stderr
    assert losses(run_dir) == losses(reference)
    enc, ref = (torch.load(d / "encoder.pt", weights_only=True)["state_dict"] for d in (run_dir, reference))
    assert enc.keys() == ref.keys() and all(torch.equal(enc[k], ref[k]) for k in ref)
    # Other data (the same images sharded at another size) is still another configuration.
    other = build_sample_shards_other(tmp_path / "other")
    proc = run("python", run_dir, other, *REFERENCE, "train.extend=true", timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "another configuration" in errors[0], proc.stderr[-2000:]


def build_sample_shards_other(out):
    """The same images sharded differently (another split seed): other data for the trainer."""
    from shardtools import run_cli

    sample = REPO / "data" / "sample_cxr"
    run_cli("build", sample, out, "--manifest", sample / "metadata.csv", "--patient-col", "patient_id",
            "--max-side", "48", "--quiet")
    return out


@pytest.mark.s3
def test_zero3_on_two_nodes_with_checkpoints_on_s3_exports_the_whole_model(s3_endpoint, pretrain_run, shards,
                                                                           tmp_path):
    """Two "nodes" of one process each (--no_ssh, one launcher per node rank, a hostfile) on loopback.
    Each has its own run_dir (node-local disk) and staging; only the bucket holds every partition. The
    losses and the exported encoder must equal the one-node ZeRO-3 run's (test_train.py's, shared)."""
    common = [*ADAMW, "train.zero_stage=3"]
    one_node = pretrain_run("deepspeed", *common)

    s3_endpoint.make_bucket("zero3")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    run_dirs = [tmp_path / "node-a", tmp_path / "node-b"]
    procs = [subprocess.Popen(
        [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={rank}",
         "--master_addr=127.0.0.1", f"--master_port={port}", "launch/pretrain.py", "--config",
         "configs/debug_cpu.yaml", f"run_dir={run_dirs[rank]}", f"data.shards={shards}", *FAST, *common,
         "train.checkpoint_dir=s3://zero3/run"],
        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    got, want = losses(run_dirs[0]), losses(one_node)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)
    enc, ref = (torch.load(d / "encoder.pt", weights_only=True)["state_dict"] for d in (run_dirs[0], one_node))
    assert enc.keys() == ref.keys()
    assert max((enc[k].float() - ref[k].float()).abs().max().item() for k in ref) < 1e-5
    # The export CLI reads the bucket directly too.
    out = tmp_path / "from-s3.pt"
    proc = subprocess.run([str(VENV_BIN / "python"), "launch/export_encoder.py", "s3://zero3/run", str(out)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(again[k], enc[k]) for k in enc)


def test_accumulated_steps_with_activation_checkpointing_count_bn_once_per_micro_batch(shards, tmp_path):
    """2 steps x 2 micro-batches through the launcher: every BN of the exported encoder has seen exactly 4
    forwards (not 8: neither the cached-embedding pass nor the recomputation counts)."""
    run_dir = tmp_path / "run"
    proc = run("deepspeed", run_dir, shards, "train.steps=2", "train.grad_accum=2", "optim.warmup_steps=0",
               "train.activation_checkpointing=true", "train.checkpoint_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    encoder = torch.load(run_dir / "encoder.pt", weights_only=True)["state_dict"]
    counts = {int(v) for k, v in encoder.items() if k.endswith("num_batches_tracked")}
    assert counts == {4}, counts
