"""The pretraining sbatch template on the one-node test cluster: it trains with DataLoader workers, is
requeued (by Slurm, or by itself after the tasks exit 99 on a signal) and resumes, on a free port."""

from __future__ import annotations

import re
import socket
import sys
import time

import pytest

from medssl_scale.distributed.launch import slurm_job_port
from shardtools import REPO
from trainrun import FAST, losses

pytestmark = [pytest.mark.slurm, pytest.mark.train]
# Slurm signals every process of the step: the DataLoader workers (data.workers=1) too.
WORKERS = "data.workers=1"


def _submit(slurm_cluster, run_dir, shards, log, *extra_sbatch: str, steps: int,
            python=REPO / ".venv" / "bin" / "python", export: str = "") -> str:
    res = slurm_cluster.run(
        "sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={log}", *extra_sbatch,
        f"--export=ALL,MEDSSL_CPU=1,MEDSSL_PYTHON={python},OMP_NUM_THREADS=1{export}",
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


# MEDSSL_PYTHON for the tests below: the real interpreter, except for task 1 of the training step in the
# job's first run (restart 0), which MEDSSL_TEST_RANK1 makes misbehave the way a GPU rank can:
#   slow-exit  after it exited training with 99, interpreter shutdown takes 15 s more (an object freed with
#              the modules, as a CUDA context or an NCCL communicator is): Python has put SIG_DFL back by then.
#   killed     the task dies of the SIGTERM srun sends once the other task exited 99 (as a rank stuck in
#              teardown dies of SIGKILL at KillWait): the rank runs as its child, and the task waits on.
#   crash      the rank exits with status 1 at step 2, in the middle of training (an uncaught error).
RANK1_WRAPPER = """\
import json, os, runpy, signal, subprocess, sys, threading, time

mode = os.environ.get("MEDSSL_TEST_RANK1")
if not (mode and sys.argv[1:2] == ["launch/pretrain.py"] and os.environ.get("SLURM_PROCID") == "1"
        and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"):
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
if mode == "killed":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # forwarded by srun to every task: the rank's to handle
    rc = subprocess.call([sys.executable, *sys.argv[1:]])
    if rc == 99:
        time.sleep(120)  # srun's SIGTERM ends the task here (or earlier, while it waits for the rank)
    sys.exit(rc)
if mode == "slow-exit":
    class SlowTeardown:
        def __del__(self, sleep=time.sleep):
            sleep(15)
    slow_teardown = SlowTeardown()
if mode == "crash":
    run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run_dir="))

    def crash_at_step_2():
        while True:
            try:
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    if json.loads(f.read().splitlines()[-1])["step"] >= 2:
                        print("rank 1: simulated crash, exit status 1", file=sys.stderr, flush=True)
                        os._exit(1)
            except (OSError, ValueError, IndexError, KeyError):
                pass
            time.sleep(0.1)

    threading.Thread(target=crash_at_step_2, daemon=True).start()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def rank1_wrapper(tmp_path):
    path = tmp_path / "python"
    path.write_text(f"#!{sys.executable}\n" + RANK1_WRAPPER)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("mode", ["slow-exit", "killed"])
def test_usr1_to_the_batch_shell_requeues_even_when_a_rank_dies_after_its_checkpoint(
        slurm_cluster, sample_shards, tmp_path, rank1_wrapper, mode):
    # Under --kill-on-bad-exit the first task to exit 99 makes srun SIGTERM the others. srun's status was
    # then 143 (slow-exit: the signal landed after Python had put SIG_DFL back; killed: the task died of it)
    # and the script, which requeued on 99 only, did not requeue. Now the ranks ignore signals once they
    # agreed to stop (slow-exit exits 99), and the script requeues on rank 0's marker (killed: srun 143).
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, sample_shards, slurm_cluster.log_dir / "pretrain-%j.out", steps=6,
                  python=rank1_wrapper, export=f",MEDSSL_TEST_RANK1={mode}")
    _wait_for_step(slurm_cluster, job, run_dir, 2)
    # What Slurm does 120 s before the time limit (--signal=B:USR1@120): USR1 to the batch shell only.
    assert slurm_cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    _start_requeued_job_now(slurm_cluster, job)
    output = _assert_resumed_once(slurm_cluster, job, run_dir, slurm_cluster.log_dir, 6)
    assert "medssl-pretrain: USR1, asking tasks to checkpoint" in output
    assert "SIGUSR1 received" in output, output[-4000:]
    requeued = [line for line in output.splitlines() if "checkpoint saved after a signal; requeueing" in line]
    assert len(requeued) == 1, output[-4000:]
    if mode == "slow-exit":
        assert "srun status 99)" in requeued[0], requeued  # every task exited 99, the slow one too
    else:
        assert re.search(r"\(signal=SIGUSR1 checkpoint=step\d{8} step=\d+; srun status 143\)", requeued[0]), requeued


def test_a_rank_that_fails_ends_the_job_at_once_and_is_not_requeued(slurm_cluster, sample_shards, tmp_path,
                                                                    rank1_wrapper):
    # --kill-on-bad-exit stays: a rank exiting 1 must not leave the others blocked in a collective.
    run_dir = tmp_path / "run"
    job = _submit(slurm_cluster, run_dir, sample_shards, slurm_cluster.log_dir / "pretrain-%j.out", steps=50,
                  python=rank1_wrapper, export=",MEDSSL_TEST_RANK1=crash")
    _wait_for_step(slurm_cluster, job, run_dir, 2)
    crashed = time.monotonic()
    state = slurm_cluster.wait(job, timeout=120)
    took = time.monotonic() - crashed
    output = (slurm_cluster.log_dir / f"pretrain-{job}.out").read_text()
    assert state == "FAILED", output[-4000:]
    assert took < 60, f"{took:.0f} s from the crash to the end of the job\n" + output[-4000:]
    assert "rank 1: simulated crash" in output and "requeueing" not in output, output[-4000:]
    assert re.search(r"Restarts=0\b", slurm_cluster.run("scontrol", "show", "job", job).stdout)
    assert losses(run_dir)[-1][0] < 50 and not (run_dir / "encoder.pt").exists()
