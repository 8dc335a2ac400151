"""The pretraining sbatch template on the one-node test cluster: it trains with DataLoader workers, is
requeued (by Slurm, or by itself after the tasks exit 99 on a signal) and resumes, on a free port."""

from __future__ import annotations

import re
import socket
import time

import pytest

from medssl_scale.distributed.launch import slurm_job_port
from shardtools import REPO
from trainrun import FAST, losses

pytestmark = [pytest.mark.slurm, pytest.mark.train]
# Slurm signals every process of the step: the DataLoader workers (data.workers=1) too.
WORKERS = "data.workers=1"


def _submit(slurm_cluster, run_dir, shards, log, *extra_sbatch: str, steps: int) -> str:
    res = slurm_cluster.run(
        "sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={log}", *extra_sbatch,
        f"--export=ALL,MEDSSL_CPU=1,MEDSSL_PYTHON={REPO / '.venv' / 'bin' / 'python'},OMP_NUM_THREADS=1",
        str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "--config", "configs/debug_cpu.yaml",
        f"run_dir={run_dir}", f"data.shards={shards}", *FAST, WORKERS, f"train.steps={steps}",
        "train.checkpoint_every=100", cwd=REPO)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def _wait_for_step(slurm_cluster, job, run_dir, step):
    deadline = time.time() + 300
    while not (losses(run_dir) and losses(run_dir)[-1][0] >= step):
        assert time.time() < deadline, f"job {job} made no progress: {slurm_cluster.state(job)}"
        time.sleep(0.5)


def _start_requeued_job_now(slurm_cluster, job):
    # Slurm holds a requeued job back for a while (begin time in the future); let it start almost at once.
    deadline = time.time() + 120
    while slurm_cluster.state(job) != "PENDING" and time.time() < deadline:
        time.sleep(0.5)
    # But not within the second of the requeue: slurmd has just revoked the killed instance's job credential,
    # and an instance started at once (0.3 s later, here) was refused as revoked too ("Killing non-startable
    # batch JobId=2: Job credential revoked"; slurmd: "already killed, do not launch"): FAILED, no restart.
    pending = time.time()
    while int(time.time()) < int(pending) + 2:
        time.sleep(0.1)
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def _assert_resumed_once(slurm_cluster, job, run_dir, log_dir, steps):
    state = slurm_cluster.wait(job, timeout=400)
    output = (log_dir / f"pretrain-{job}.out").read_text()
    assert state == "COMPLETED", output[-4000:]
    info = slurm_cluster.run("scontrol", "show", "job", job).stdout
    assert int(re.search(r"Restarts=(\d+)", info).group(1)) >= 1
    assert "restart 1" in output and "resumed from step" in output
    assert "DataLoader worker" not in output and "Traceback" not in output, output[-4000:]
    assert [s for s, _ in losses(run_dir)] == list(range(1, steps + 1))  # every step once: no rerun from 0
    assert (run_dir / "encoder.pt").exists()
    return output


def test_pretrain_job_is_requeued_and_resumes(slurm_cluster, sample_shards, tmp_path):
    shards = sample_shards  # conftest: built once per session, read only
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, shards, slurm_cluster.log_dir / "pretrain-%j.out", steps=10)
    _wait_for_step(slurm_cluster, job, run_dir, 3)
    # Requeue: Slurm signals every process of the job (SIGTERM), the tasks checkpoint, and the job starts again.
    assert slurm_cluster.run("scontrol", "requeue", job).returncode == 0
    _start_requeued_job_now(slurm_cluster, job)
    output = _assert_resumed_once(slurm_cluster, job, run_dir, slurm_cluster.log_dir, 10)
    assert "SIGTERM received" in output


def test_scancel_signal_checkpoints_exits_99_and_the_script_requeues_on_a_free_port(slurm_cluster, sample_shards,
                                                                                      tmp_path):
    shards = sample_shards
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, shards, slurm_cluster.log_dir / "pretrain-%j.out", "--hold", steps=6)
    # Another job already listens on the port this job's id maps to: the template must pick another one.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", slurm_job_port(job)))
        taken.listen()
        assert slurm_cluster.run("scontrol", "release", job).returncode == 0
        _wait_for_step(slurm_cluster, job, run_dir, 2)
        # SIGTERM to the tasks only (not the batch script): the script requeues the job only when srun
        # exits with the trainer's 99, "checkpoint saved after a signal".
        assert slurm_cluster.run("scancel", "--signal=TERM", job).returncode == 0
        _start_requeued_job_now(slurm_cluster, job)
        output = _assert_resumed_once(slurm_cluster, job, run_dir, slurm_cluster.log_dir, 6)
    assert "checkpoint saved after a signal; requeueing" in output
    ports = {int(p) for p in re.findall(r"restart \d+ on \S+ port (\d+)", output)}
    assert ports and slurm_job_port(job) not in ports, output[:2000]
