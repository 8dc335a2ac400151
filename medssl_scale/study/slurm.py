"""The study on Slurm: the cells as job arrays of launch/slurm/study.sbatch (one cell per task, the task id
is the cell's index in cells.json), then one aggregation job that waits for them (afterany: it runs even
when cells failed, and reports them).

Cells that share cached features wait for the one that extracts them (runner.plan): those are a second
array, started when the first has ended. Only the cells not done are submitted (`--array=2,5-7`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..config import ConfigError
from .cells import Cell
from .config import StudyConfig
from .runner import REPO, plan

SBATCH = REPO / "launch" / "slurm" / "study.sbatch"


class SubmitError(RuntimeError):
    """sbatch refused a job; the message is one line with sbatch's own words."""


def array_spec(indices: list[int]) -> str:
    """Sorted indices as Slurm's compact list: [0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _common(study: StudyConfig) -> list[str]:
    args = [f"--time={study.slurm.time}"]
    if study.slurm.partition:
        args.append(f"--partition={study.slurm.partition}")
    return args


def aggregation_args(cell_args: list[str]) -> list[str]:
    """The cells' extra sbatch arguments (an --account or --qos the cluster requires) apply to the aggregation
    too, but not their GPU requests: it only reads metrics.json files."""
    return [a for a in cell_args if not a.startswith(("--gpus", "--gres", "--gpu", "--mem-per-gpu"))]


def sbatch(args: list[str], env: dict) -> str:
    try:
        res = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=REPO)
    except FileNotFoundError:
        raise ConfigError("backend=slurm needs sbatch on PATH (or use backend=local)") from None
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise SubmitError(f"sbatch failed (exit {res.returncode}): {lines[-1] if lines else 'no message'}"[:400])
    return res.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def submit(study: StudyConfig, pending: list[Cell], done: list[Cell], log=print) -> dict:
    """Submit the cell array(s) and the aggregation job; returns (and writes to slurm/jobs.json) their ids."""
    out = Path(study.study_dir) / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    # The tasks run the interpreter that submitted them (the project's venv) unless MEDSSL_PYTHON says otherwise.
    env = {**os.environ, "MEDSSL_PYTHON": os.environ.get("MEDSSL_PYTHON", sys.executable)}
    first, waits = plan(pending, done)
    throttle = f"%{study.slurm.max_parallel}" if study.slurm.max_parallel else ""
    cell_args = [*_common(study), f"--cpus-per-task={study.slurm.cpus_per_task}", "--job-name=medssl-study",
                 f"--output={out}/cell-%A_%a.out", *study.slurm.args]
    jobs: dict = {"cells": [], "arrays": []}
    after = []
    for wave in (first, [c for c in pending if c.index in waits]):
        if not wave:
            continue
        spec = array_spec([c.index for c in wave]) + throttle
        dep = [f"--dependency=afterany:{':'.join(after)}"] if after else []
        job = sbatch([f"--array={spec}", *dep, *cell_args, str(SBATCH), study.study_dir], env)
        log(f"study: submitted {len(wave)} cell(s) as array job {job} (--array={spec})"
            + (f", after job {':'.join(after)}" if after else ""))
        jobs["arrays"].append({"job": job, "array": spec, "cells": [c.index for c in wave]})
        jobs["cells"] = [a["job"] for a in jobs["arrays"]]
        (out / "jobs.json").write_text(json.dumps(jobs, indent=2) + "\n")  # what is queued, should a later sbatch fail
        after.append(job)
    agg = sbatch([*_common(study), "--cpus-per-task=1", "--job-name=medssl-study-aggregate",
                  *aggregation_args(study.slurm.args),
                  *([f"--dependency=afterany:{':'.join(after)}"] if after else []),
                  f"--output={out}/aggregate-%j.out", str(SBATCH), study.study_dir, "--aggregate"], env)
    log(f"study: aggregation job {agg} runs when the cells have ended; results in {study.study_dir}")
    jobs["aggregate"] = agg
    jobs["cells"] = [a["job"] for a in jobs["arrays"]]
    (out / "jobs.json").write_text(json.dumps(jobs, indent=2) + "\n")
    return jobs
