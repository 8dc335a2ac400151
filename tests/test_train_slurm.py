"""The pretraining sbatch template on the one-node test cluster: it trains, is requeued, and resumes."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from shardtools import REPO
from trainrun import FAST, build_sample_shards, losses

pytestmark = [pytest.mark.slurm, pytest.mark.train]


def test_pretrain_job_is_requeued_and_resumes(slurm_cluster, tmp_path):
    shards = build_sample_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    log = slurm_cluster.log_dir / "pretrain-%j.out"
    res = slurm_cluster.run(
        "sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={log}",
        f"--export=ALL,MEDSSL_CPU=1,MEDSSL_PYTHON={REPO / '.venv' / 'bin' / 'python'},OMP_NUM_THREADS=1",
        str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "--config", "configs/debug_cpu.yaml",
        f"run_dir={run_dir}", f"data.shards={shards}", *FAST, "train.steps=10", "train.checkpoint_every=100",
        cwd=REPO)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    deadline = time.time() + 300
    while not (losses(run_dir) and losses(run_dir)[-1][0] >= 3):
        assert time.time() < deadline, f"job {job} made no progress: {slurm_cluster.state(job)}"
        time.sleep(0.5)
    # Requeue: Slurm signals the tasks (SIGTERM), they checkpoint, and the job starts again.
    assert slurm_cluster.run("scontrol", "requeue", job).returncode == 0
    # Slurm holds a requeued job back for a while (begin time in the future); let it start at once.
    deadline = time.time() + 120
    while slurm_cluster.state(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    state = slurm_cluster.wait(job, timeout=400)
    output = (slurm_cluster.log_dir / f"pretrain-{job}.out").read_text()
    assert state == "COMPLETED", output[-4000:]
    info = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert int(re.search(r"Restarts=(\d+)", info).group(1)) >= 1
    assert "restart 1" in output and "resumed from step" in output
    steps = [s for s, _ in losses(run_dir)]
    assert steps == list(range(1, 11))  # every step once: the rerun went on from the checkpoint
    assert (run_dir / "encoder.pt").exists()
