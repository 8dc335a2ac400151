"""Resuming and exporting the way clusters do it: shards moved and loader workers changed between runs,
a finished run extended, and ZeRO-3 across two nodes with checkpoints on object storage."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from shardtools import REPO
from trainrun import FAST, VENV_BIN, build_sample_shards, env, free_port, losses, run

pytestmark = pytest.mark.train
# A constant learning rate, so that a run of 2 steps extended to 4 is the 4-step run exactly.
CONSTANT_LR = ["optim.lr_scaling=none", "optim.base_lr=0.05", "optim.final_lr=0.05", "optim.warmup_steps=0",
               "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_sample_shards(tmp_path_factory.mktemp("resume") / "shards")


def test_extend_a_finished_run_after_moving_the_shards_and_adding_workers(shards, tmp_path):
    reference = tmp_path / "reference"
    proc = run("deepspeed", reference, shards, *CONSTANT_LR, "train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    proc = run("deepspeed", run_dir, shards, *CONSTANT_LR, "train.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved = tmp_path / "elsewhere" / "shards"
    shutil.copytree(shards, moved)
    # Asking for more steps without saying so is refused in one line, naming the key that allows it.
    proc = run("python", run_dir, moved, *CONSTANT_LR, "train.steps=4", timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "train.extend=true" in errors[0], proc.stderr[-2000:]
    # The shards now live elsewhere and the loader has a worker process: neither changes the result.
    proc = run("deepspeed", run_dir, moved, *CONSTANT_LR, "train.steps=4", "train.extend=true", "data.workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stdout + proc.stderr
    assert losses(run_dir) == losses(reference)
    enc, ref = (torch.load(d / "encoder.pt", weights_only=True)["state_dict"] for d in (run_dir, reference))
    assert all(torch.equal(enc[k], ref[k]) for k in ref)
    # Other data (the same images sharded at another size) is still another configuration.
    other = build_sample_shards_other(tmp_path / "other")
    proc = run("python", run_dir, other, *CONSTANT_LR, "train.steps=4", "train.extend=true", timeout=300)
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
def test_zero3_on_two_nodes_with_checkpoints_on_s3_exports_the_whole_model(s3_endpoint, shards, tmp_path):
    """Two "nodes" of one process each (--no_ssh, one launcher per node rank, a hostfile) on loopback.
    Each has its own run_dir (node-local disk) and staging; only the bucket holds every partition. The
    losses and the exported encoder must equal the one-node ZeRO-3 run's."""
    common = ["train.steps=2", "train.checkpoint_every=2", "optim.name=adamw", "optim.base_lr=0.001",
              "optim.warmup_steps=1", "train.zero_stage=3"]
    one_node = tmp_path / "one-node"
    proc = run("deepspeed", one_node, shards, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]

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
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2]
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
