"""Running cells: the launcher command of one cell, a local pool of N cells at a time, one cell of an array.

Every cell is a separate run of launch/finetune.py (a process, or an `accelerate launch` of several), its
output appended to the cell's log.txt. Cells that read the same cached features (one encoder file, or one
random init's seed) would all extract them when started together; so one of them, the largest fraction (the
least likely to fail its draw), goes first and the others start once it has ended (plan()).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from .cells import Cell, prepare, read_json
from .config import StudyConfig

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "launch" / "finetune.py"
RESUMABLE = 99  # the eval job's exit status after a signal: a fine-tune checkpoint was saved


def launcher_dict(study: StudyConfig) -> dict:
    la = study.launcher
    return {"kind": la.kind, "num_processes": la.num_processes, "cpu": la.cpu, "args": list(la.args)}


def launcher_argv(launcher: dict, config_path: str | Path, python: str = sys.executable) -> list[str]:
    """`python launch/finetune.py --config C`, or the same through `accelerate launch` (on a free port, so
    that cells sharing a node do not meet on accelerate's default one)."""
    job = [str(FINETUNE), "--config", str(config_path)]
    if launcher["kind"] == "python":
        return [python, *job]
    from ..distributed.launch import free_port

    argv = [python, "-m", "accelerate.commands.launch"]
    if launcher.get("cpu"):
        argv.append("--cpu")
    if launcher.get("num_processes"):
        argv += ["--num_processes", str(launcher["num_processes"])]
    # The precision comes from finetune.precision (it overrides the launcher's); `no` only silences the
    # launcher's warning about unset defaults, as does the explicit machine count and dynamo backend.
    argv += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(free_port()), *launcher.get("args", []), *job]
    return argv


def child_env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)  # N cells on C cores: C / N threads each, not C each
    return env


def status_of(cell: Cell) -> dict | None:
    return read_json(cell.dir / "status.json")


def last_error(log: Path) -> str:
    """The line that says why a cell failed: the eval job's one-line error, else the log's last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("finetune: error:")]
    return (errors or lines or ["empty log"])[-1][:300]


def describe(status: dict) -> str:
    """How a cell's attempt ended, in the words of a progress line."""
    rc = status["rc"]
    if rc == 0:
        return f"done in {status['seconds']:.1f} s"
    if rc == RESUMABLE:
        return f"stopped by a signal (exit 99), checkpoint saved: the next run resumes it; log: {status['log']}"
    if rc < 0:  # the cell's process died of a signal (a linear/kNN cell has no checkpoint): redone next run
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"stopped by {name} (no result; the next run redoes it); log: {status['log']}"
    return f"FAILED (exit {rc}): {status['error']}; log: {status['log']}"


def _open_log(cell: Cell, argv: list[str]):
    log = open(cell.dir / "log.txt", "a")
    log.write(f"== study: {time.strftime('%Y-%m-%d %H:%M:%S')} on {os.uname().nodename}: {' '.join(argv)}\n")
    log.flush()
    return log


def _finish(cell: Cell, rc: int, started: float, argv: list[str]) -> dict:
    status = {"rc": rc, "seconds": round(time.time() - started, 2), "log": str(cell.dir / "log.txt"),
              "command": argv, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rc != 0:
        status["error"] = last_error(cell.dir / "log.txt")
    (cell.dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    return status


def plan(pending: list[Cell], done: list[Cell]) -> tuple[list[Cell], dict[int, int]]:
    """(cells that can start at once, {cell index: the index of the cell it waits for})."""
    cached = {c.cache_group for c in done if c.cache_group}
    leaders: dict[str, Cell] = {}
    for c in sorted(pending, key=lambda c: (-c.fraction, c.index)):
        if c.cache_group and c.cache_group not in cached and c.cache_group not in leaders:
            leaders[c.cache_group] = c
    waits = {c.index: leaders[c.cache_group].index for c in pending
             if c.cache_group in leaders and leaders[c.cache_group] is not c}
    return [c for c in pending if c.index not in waits], waits


def run_local(cells: list[Cell], done: list[Cell], launcher: dict, workers: int,
              log: Callable[[str], None] = print, poll_s: float = 0.2) -> dict[int, dict]:
    """Run `cells` with at most `workers` at a time; returns {index: status}. Ctrl-C reaches the cells too
    (one process group): fine-tunes checkpoint and exit 99; the pool waits for them, then re-raises."""
    first, waits = plan(cells, done)
    queue = list(first) + [c for c in cells if c.index in waits]
    threads = max(1, len(os.sched_getaffinity(0)) // workers) if workers > 1 else None
    running: dict[int, tuple[subprocess.Popen, Cell, float, list[str], object]] = {}
    results: dict[int, dict] = {}
    total = len(cells)
    try:
        while queue or running:
            startable = [c for c in queue if waits.get(c.index) is None or waits[c.index] in results]
            while startable and len(running) < workers:
                cell = startable.pop(0)
                queue.remove(cell)
                argv = launcher_argv(launcher, prepare(cell))
                out = _open_log(cell, argv)
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(threads),
                                        cwd=REPO)
                running[proc.pid] = (proc, cell, time.time(), argv, out)
            for pid, (proc, cell, started, argv, out) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                out.close()
                del running[pid]
                status = results[cell.index] = _finish(cell, rc, started, argv)
                log(f"study: [{len(results)}/{total}] {cell.name} {describe(status)}")
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for proc, *_ in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    return results


def run_one(cell: Cell, launcher: dict, log: Callable[[str], None] = print) -> int:
    """One cell in the foreground (a Slurm array task). Slurm's SIGTERM/SIGUSR1 (time limit, preemption,
    scancel) is passed on to the whole launcher group, so a fine-tune checkpoints and exits 99."""
    argv = launcher_argv(launcher, cell.dir / "cell.yaml")
    out = _open_log(cell, argv)
    started = time.time()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(None), cwd=REPO,
                            start_new_session=True)

    def forward(sig, _frame):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    rc = proc.wait()
    out.close()
    status = _finish(cell, rc, started, argv)
    log(f"study: {cell.name} {describe(status)}" + (f"; log: {status['log']}" if rc == 0 else ""))
    return rc
