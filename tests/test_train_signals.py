"""Signals, ports and launch errors through the real deepspeed launcher (2 CPU processes, DataLoader workers):
SIGTERM or Ctrl-C to the whole process group checkpoints and resumes exactly, a signal on one rank is named
by all, CPU thread counts, a taken rendezvous port, and user errors that are one line, once.

Runs are compared with conftest's session `reference` (trainrun.REFERENCE: shared with test_train.py); the
runs here differ from it only in what leaves the weights alone (loader workers, checkpoint cadence)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from shardtools import REPO
from trainrun import (FAST, REFERENCE, VENV_BIN, env, env_without_omp, losses, run, signal_group, start_logged,
                      wait_for_step)

pytestmark = pytest.mark.train
# The reference's run, with DataLoader workers on (Slurm and a terminal signal them too; FAST alone has none)
# and no periodic checkpoint before the end: a checkpoint found after a signal is the one the signal saved.
STEPS = [o for o in REFERENCE if not o.startswith("train.checkpoint_every=")] + ["train.checkpoint_every=100",
                                                                                "data.workers=1"]


@pytest.fixture(scope="module")
def shards(sample_shards):
    return sample_shards


def _checkpoint_step(run_dir) -> int:
    return json.loads((run_dir / "checkpoints" / "complete.json").read_text())["step"]


def _warnings(output: str, pattern: str) -> list[str]:
    return [line for line in output.splitlines() if "WARNING" in line and re.search(pattern, line)]


@contextlib.contextmanager
def _sigint_as_in_a_terminal():
    """Start children with SIGINT at its default, as a shell does for the command it runs in the foreground.
    A child inherits an ignored (or blocked) signal, and pytest itself may have it so: a non-interactive
    shell starts its background commands (`make test &`, CI wrappers) with SIGINT and SIGQUIT ignored. The
    deepspeed command then ignores the Ctrl-C too, waits for launch.py and exits with its status, 1
    (`launch/demo.sh` does this on purpose, docs/training.md); that, not load, failed the Ctrl-C test once.
    A Python handler here is reset to the default by exec in the child; both are restored afterwards."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)


def _ignores_sigint(pid: int) -> bool:
    fields = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return any(int(fields[key], 16) & (1 << (signal.SIGINT - 1)) for key in ("SigIgn", "SigBlk"))


@pytest.fixture(scope="module")
def sigterm_then_ctrl_c(shards, tmp_path_factory):
    """One run, two launches: SIGTERM to the group of the first at step 2 or later; the rerun (which resumes)
    gets Ctrl-C two steps after the step it resumed from. What each saw, as (exit status, output, checkpoint
    step, losses) after each launch, for the two tests below."""
    tmp = tmp_path_factory.mktemp("sigterm")
    run_dir, seen = tmp / "run", []
    for sig, log, step in ((signal.SIGTERM, tmp / "sigterm.log", 2), (signal.SIGINT, tmp / "ctrl-c.log", None)):
        with _sigint_as_in_a_terminal():
            proc = start_logged("deepspeed", run_dir, shards, *STEPS, log=log)
        assert not _ignores_sigint(proc.pid)  # the deepspeed command, as a terminal would start it
        wait_for_step(run_dir, step or seen[0][2] + 2, proc)
        rc = signal_group(proc, sig)  # SIGINT to the group is what Ctrl-C in a terminal does
        seen.append((rc, log.read_text(), _checkpoint_step(run_dir), losses(run_dir)))
    return seen


def test_sigterm_to_the_group_with_loader_workers_checkpoints_and_resumes(reference, sigterm_then_ctrl_c):
    (rc, output, saved_step, records), (_, rerun, _, rerun_records) = sigterm_then_ctrl_c
    # The deepspeed command has no SIGTERM handler on one node: it dies of the signal at once (143 in a
    # shell); its launch.py child terminates the ranks' trees and waits up to 30 s, then exits 1.
    assert rc == -signal.SIGTERM, output[-3000:]
    assert "DataLoader worker" not in output and "Traceback" not in output, output[-3000:]
    saved = _warnings(output, r"SIGTERM received \(by [12] of 2 ranks\)")  # a rank may agree before its signal lands
    assert len(saved) == 1 and "exiting with status 99" in saved[0], output[-3000:]
    assert saved_step == records[-1][0] >= 2  # the last step run is the one saved
    # The rerun resumes from it exactly: every step it ran (two at least) has the reference's loss.
    assert f"resumed from step {saved_step} " in rerun, rerun[-3000:]
    assert len(rerun_records) >= saved_step + 2 and rerun_records == losses(reference)[:len(rerun_records)]


def test_ctrl_c_checkpoints_with_one_line_and_no_rank_tracebacks(sigterm_then_ctrl_c):
    (_, _, first_saved, _), (rc, output, saved_step, records) = sigterm_then_ctrl_c
    saved = _warnings(output, r"SIGINT received \(by [12] of 2 ranks\)")
    assert len(saved) == 1 and "checkpoint step" in saved[0], output[-3000:]
    assert saved_step == records[-1][0] >= first_saved + 2 >= 2
    # The only traceback left is the deepspeed command's own (runner.py waits for launch.py without a SIGINT
    # handler on one node); it exits of SIGINT (130 in a shell).
    tracebacks = output.split("Traceback (most recent call last):")[1:]
    assert len(tracebacks) <= 1 and all("deepspeed/launcher/runner.py" in t for t in tracebacks), output[-3000:]
    # Guaranteed whatever the load, since the command does not ignore SIGINT (the fixture sees to it): the
    # KeyboardInterrupt interrupts runner.py's Popen.wait(), which waits 0.25 s more for launch.py and raises it
    # again, and Python exits by re-sending SIGINT to itself. launch.py's own path (SIGTERM to each rank's tree,
    # up to 30 s, then SIGKILL, then exit 1) only sets the status when runner.py outlives it: with SIGINT ignored.
    assert rc == -signal.SIGINT, output[-3000:]


@pytest.fixture(scope="module")
def usr1_on_rank1(shards, tmp_path_factory):
    """A run without OMP_NUM_THREADS; SIGUSR1 reaches rank 1 only (not rank 0, which logs)."""
    tmp = tmp_path_factory.mktemp("usr1")
    run_dir, log = tmp / "run", tmp / "out.log"
    proc = start_logged("deepspeed", run_dir, shards, *STEPS, log=log, environ=env_without_omp())
    wait_for_step(run_dir, 2, proc)
    # The rank process, not its DataLoader worker (a fork of it, with the same command line).
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "--local_rank=1" in p.cmdline() and "--local_rank=1" not in p.parent().cmdline()]
    assert len(ranks) == 1, ranks
    ranks[0].send_signal(signal.SIGUSR1)
    rc = proc.wait(timeout=150)
    return run_dir, log.read_text(), rc


def test_a_signal_on_one_rank_is_agreed_and_named(usr1_on_rank1):
    run_dir, output, rc = usr1_on_rank1
    assert rc == 99, output[-3000:]  # both ranks exited 99: launch.py passes the status on
    saved = _warnings(output, r"SIGUSR1 received \(by 1 of 2 ranks\)")
    assert len(saved) == 1, output[-3000:]
    assert _checkpoint_step(run_dir) == losses(run_dir)[-1][0] >= 2


def test_cpu_threads_without_omp_num_threads_are_cores_over_processes(usr1_on_rank1):
    _, output, _ = usr1_on_rank1
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    lines = [line for line in output.splitlines() if "CPU threads per process:" in line]
    assert len(lines) == 1 and f"CPU threads per process: {expected} (" in lines[0], output[-3000:]


def test_a_taken_rendezvous_port_is_one_line_naming_master_port(shards, tmp_path):
    with socket.socket() as taken:  # another job's rendezvous, as far as the trainer can tell
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py",
             "--config", "configs/debug_cpu.yaml", f"run_dir={tmp_path / 'run'}", f"data.shards={shards}", *FAST],
            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "--master_port" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_config_error_under_the_deepspeed_launcher_appears_once(shards, tmp_path):
    proc = run("deepspeed", tmp_path / "run", shards, "train.stepz=3", timeout=300)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "pretrain: error:" in line]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "did you mean 'train.steps'" in errors[0], proc.stderr[-2000:]


@pytest.mark.parametrize("where", ["/sys/medssl-run", "file/run"])
def test_an_unwritable_run_dir_is_one_line_before_any_work(shards, tmp_path, where):
    (tmp_path / "file").write_text("a regular file, not a folder")
    run_dir = where if where.startswith("/") else tmp_path / where
    # Also bad shards: the run_dir check comes first, before data is opened.
    proc = run("python", run_dir, shards, "data.shards=/nonexistent/shards", timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and f"run_dir={run_dir} cannot be written" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_pretrain_without_config_names_the_option_and_an_example():
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "train.steps=3"], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pretrain: error: --config is required: name a run config, e.g. --config configs/debug_cpu.yaml "
        "(configs/ holds one per stage)"]


def test_cpu_thread_rule_and_port_fallback():
    from medssl_scale.distributed.env import DistEnv, resolve
    from medssl_scale.distributed.launch import cpu_threads, free_port, slurm_job_port

    cores = len(os.sched_getaffinity(0))
    two = DistEnv(0, 2, 0, 2, "torchrun")
    assert cpu_threads(two, {}) == max(1, cores // 2)
    assert cpu_threads(two, {"OMP_NUM_THREADS": "4"}) is None  # the user's choice stands
    assert cpu_threads(DistEnv(0, 8, 0, 8, "slurm"), {"SLURM_CPUS_PER_TASK": "3"}) == 3  # already per task
    # The deepspeed launcher names the processes of a node LOCAL_SIZE (torchrun: LOCAL_WORLD_SIZE).
    assert resolve({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8"}).local_world_size == 8
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert free_port(port) != port
    assert 20000 <= slurm_job_port("123") < 40000 and slurm_job_port("123") == slurm_job_port("123")
