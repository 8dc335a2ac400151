"""Helpers for trainer tests: shards of the shipped sample, and real launcher runs (deepspeed, torchrun)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shardtools import REPO, run_cli

VENV_BIN = Path(sys.executable).parent
# Small and fast, still the real trainer: ResNet-18 at 32 px, 2 processes x 8 pairs.
FAST = ["augment.size=32", "model.head_hidden=64", "model.out_dim=32", "train.global_batch=16",
        "data.workers=0", "train.log_every=1", "monitor.shards=null"]
# The debug config's monitor, on a labelled build of the sample of its own (conftest `monitor_shards`):
# test_monitor.py turns it on with MONITOR + [f"monitor.shards={monitor_shards}"].
MONITOR = ["monitor.every=3", "monitor.workers=1"]
# The shared reference run (conftest `reference`): 8 steps of LARS, 5 of warmup (each step's learning rate
# independent of the run's length, so a 5-step run is its first 5 steps exactly) then 3 of cosine decay;
# 4 steps per epoch (51 training bags, 2 ranks x 8), so it crosses an epoch and trains on two padded last
# batches. Checkpoints at steps 2, 4, 6, 8 (keep_checkpoints=2 leaves 6 and 8). Neither the checkpoint
# cadence nor data.workers changes the weights (RunConfig.content_hash leaves them out).
#
# It trains at the linear-scaling learning rate (peak 0.3 x 16/256 = 0.019), not the debug config's 0.3: at
# 0.3 the trajectory is ill-conditioned by step 8 (a 1e-6 relative nudge to the weights before step 7 moves
# a BN weight by 6e-4 at step 8 in a float64 run, measured 2026-12-03), so float32 rounding alone would hide
# the bit-level agreement with plain LARS that test_train.py proves; nothing the other tests compare
# (the trainer with itself, across launchers, resumes and signals) depends on the rate.
REFERENCE_LR = ["optim.lr_scaling=linear", "optim.base_lr=0.3"]
REFERENCE = ["train.steps=8", "train.checkpoint_every=2", *REFERENCE_LR]
# Its first 5 steps as a run of their own (conftest `pretrain_run("torchrun", *FIVE_STEPS)`): test_train.py
# compares its losses with the reference's, test_train_resume.py extends a copy of it to the 8 steps.
FIVE_STEPS = ["train.steps=5", "train.checkpoint_every=2", *REFERENCE_LR]
# AdamW for the ZeRO stages (LARS is refused with ZeRO > 0); conftest `pretrain_run` shares each stage's run.
ADAMW = ["train.steps=3", "train.checkpoint_every=3", "optim.name=adamw", "optim.base_lr=0.001",
         "optim.warmup_steps=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_sample_shards(out: Path) -> Path:
    sample = REPO / "data" / "sample_cxr"
    run_cli("build", sample, out, "--manifest", sample / "metadata.csv", "--patient-col", "patient_id",
            "--max-side", "64", "--quiet")
    return out


def build_monitor_shards(out: Path) -> Path:
    """The sample again, labelled by view and split 70/30 by patient: the monitor's bank and scored images."""
    sample = REPO / "data" / "sample_cxr"
    run_cli("build", sample, out, "--manifest", sample / "metadata.csv", "--patient-col", "patient_id",
            "--label-cols", "finding,view", "--splits", "train=0.7,val=0.3", "--max-side", "64", "--quiet")
    return out


def launcher_cmd(launcher: str, run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    args = ["launch/pretrain.py", "--config", "configs/debug_cpu.yaml", f"run_dir={run_dir}",
            f"data.shards={shards}", *FAST, *overrides]
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args]
    if launcher == "torchrun":
        return [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *args]
    return [sys.executable, *args]


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(launcher: str, run_dir: Path, shards: Path, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(launcher_cmd(launcher, run_dir, shards, *overrides), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc


def start(launcher: str, run_dir: Path, shards: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(launcher_cmd(launcher, run_dir, shards, *overrides), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # Records without a loss are the step-0 monitor measurement (test_monitor.py).
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if r and "loss" in r]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if losses(run_dir) and losses(run_dir)[-1][0] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=120)


def env_without_omp() -> dict:
    """env() without OMP_NUM_THREADS: the trainer then chooses each process's CPU thread count."""
    e = env()
    e.pop("OMP_NUM_THREADS", None)
    return e


def start_logged(launcher: str, run_dir: Path, shards: Path, *overrides: str, log: Path,
                 environ: dict | None = None) -> subprocess.Popen:
    """start(), with stdout and stderr in `log`: the ranks keep writing there after a launcher that a signal
    ended at once (the deepspeed command does) has gone."""
    with open(log, "w") as out:
        return subprocess.Popen(launcher_cmd(launcher, run_dir, shards, *overrides), cwd=REPO,
                                env=environ or env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def session_processes(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session `sid` (start()ed launchers lead their own)."""
    import psutil

    pids = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
        except (OSError, psutil.Error):
            pass
    return pids


def signal_group(proc: subprocess.Popen, sig: int, timeout: float = 150) -> int:
    """Send `sig` to the launcher's whole process group (ranks and DataLoader workers included), as Slurm,
    `kill -- -PGID` or a terminal's Ctrl-C do; wait until every process of it has exited, since a launcher
    may exit before its ranks. Returns the launcher's exit status (negative: killed by that signal)."""
    os.killpg(proc.pid, sig)
    rc = proc.wait(timeout=timeout)
    deadline = time.time() + timeout
    while session_processes(proc.pid):
        if time.time() > deadline:
            raise AssertionError(f"processes {session_processes(proc.pid)} still running {timeout} s after {sig!r}")
        time.sleep(0.2)
    return rc
