"""A whole study, end to end (launch/study.py): check, list the cells, run the ones not done (local pool or
Slurm arrays), aggregate. Also the one-cell entry point of a Slurm array task."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..train.rundir import check_run_dir
from . import aggregate as agg
from . import report
from .cells import Cell, expand, identity, init_digests, is_done, prepare, read_json, write_cells_json
from .config import StudyConfig, dump_study_config, load_study_config
from .validate import resolve_metric, validate

OUTPUTS = ("label_efficiency.csv", "label_efficiency.png", "summary.md", "headline.json")


@dataclass
class Plan:
    study: StudyConfig
    cells: list[Cell]
    metric: str

    @property
    def done(self) -> list[Cell]:
        return [c for c in self.cells if is_done(c)]


def load(config: str, overrides: list[str], full_checks: bool = True) -> Plan:
    """The study and its cells; every check that needs no cell run (full_checks: files, shards, labels)."""
    study = load_study_config(config, overrides)
    cells = expand(study, init_digests(study))
    if full_checks:
        metric = validate(study, cells)
    else:  # aggregation only: the cells' own metrics.json say what the data were
        metric = resolve_metric(study, cells[0].config.task.type, None)
    check_run_dir(study.study_dir, "study_dir")
    return Plan(study, cells, metric)


def record(plan: Plan) -> None:
    """study.yaml and cells.json, written only when cells are run or submitted (not by --dry-run or
    --aggregate-only): queued Slurm array tasks find their cell through cells.json."""
    study, d = plan.study, Path(plan.study.study_dir)
    # The resolved config (absolute paths): `--config <study_dir>/study.yaml` is this study from anywhere.
    tmp = d / ".study.yaml.tmp"
    tmp.write_text("# the resolved study config, written by launch/study.py\n" + dump_study_config(study))
    tmp.replace(d / "study.yaml")
    write_cells_json(study, plan.cells, d / "cells.json")


def aggregate_and_report(plan: Plan, log=print, console=None) -> int:
    """Write the study's outputs from the finished cells; 0 when every cell is done, else 1 (and say which)."""
    s, d = plan.study, Path(plan.study.study_dir)
    inits, protocols, fractions = list(s.inits), list(s.protocols), [float(f) for f in s.fractions]
    rows = agg.collect(plan.cells, plan.metric, d)
    agg.write_csv(rows, d / "label_efficiency.csv")
    points = agg.summarize(rows, len(s.seeds))
    heads = agg.headlines(points, inits, protocols, s.baseline, plan.metric)
    from ..finetune.outputs import _atomic

    with _atomic(d / "summary.md", "w") as f:
        f.write(report.markdown(study_dir=str(d), metric=plan.metric, inits=inits, protocols=protocols,
                                fractions=fractions, seeds=list(s.seeds), baseline=s.baseline, points=points,
                                heads=heads, rows=rows))
    with _atomic(d / "headline.json", "w") as f:
        f.write(report.headline_json(heads, plan.metric))
    report.plot(d / "label_efficiency.png", points, inits, protocols, fractions, s.baseline, plan.metric)
    report.print_tables(heads, points, inits, protocols, fractions, plan.metric, console)
    missing = [r for r in rows if r["status"] != "done" or r.get("value") is None]
    for r in missing:
        log(f"study: missing {r['cell']}: {r['status']}" + (f" ({r['error']}); log: {r['log']}" if r["error"] else ""))
    log(f"study: aggregated {len(rows) - len(missing)} of {len(rows)} cells: " + ", ".join(str(d / o) for o in OUTPUTS))
    return 1 if missing else 0


@contextlib.contextmanager
def _lock(study_dir: Path):
    """One local runner per study: two would run the same cells in the same folders at once."""
    import fcntl

    with open(study_dir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another launch/study.py is running the cells of {study_dir}: let it finish "
                              f"(or stop it) first") from None
        yield


def run_cell(study_dir: str, index: int, log=print) -> int:
    """Cell `index` of <study_dir>/cells.json, unless it is done (what one Slurm array task runs)."""
    from .runner import run_one

    doc = read_json(Path(study_dir) / "cells.json")
    if doc is None:
        raise ConfigError(f"{study_dir}/cells.json is missing or unreadable: submit the study with launch/study.py")
    entry = next((c for c in doc["cells"] if c["index"] == index), None)
    if entry is None:
        raise ConfigError(f"{study_dir}/cells.json has no cell {index} (it lists {len(doc['cells'])})")
    cell = Cell.from_dict(entry)
    if is_done(cell):
        log(f"study: {cell.name} is done already ({cell.dir}/metrics.json); skipped")
        return 0
    prepared = read_json(cell.dir / "cell.json") or {}
    if {k: prepared.get(k) for k in identity(cell)} != identity(cell) or not (cell.dir / "cell.yaml").exists():
        raise ConfigError(f"cell {cell.name} was not prepared for this cells.json (the study changed after "
                          f"submission?): resubmit with launch/study.py --config {study_dir}/study.yaml")
    return run_one(cell, doc["launcher"], log=log)


def run_study(config: str, overrides: list[str], *, aggregate_only: bool = False, dry_run: bool = False,
              log=print) -> int:
    from .runner import launcher_dict, run_local

    plan = load(config, overrides, full_checks=not aggregate_only)
    s = plan.study
    done = plan.done
    done_idx = {c.index for c in done}
    pending = [c for c in plan.cells if c.index not in done_idx]
    log(f"study: {report.count(len(plan.cells), 'cell')} in {s.study_dir}: {len(done)} done, {len(pending)} to run"
        + ("" if aggregate_only or not pending else f" ({s.backend}"
           + (f", {s.workers} at a time)" if s.backend == "local" else ")")))
    if dry_run:
        for c in plan.cells:
            log(f"  [{c.index}] {c.name}: {'done' if c.index in done_idx else 'to run'}  ({c.dir})")
        return 0
    if aggregate_only:
        return aggregate_and_report(plan, log)
    record(plan)
    if s.backend == "slurm" and pending:
        from .slurm import submit

        for c in pending:
            prepare(c)
        submit(s, pending, done, log=log)
        return 0
    with _lock(Path(s.study_dir)):
        results = run_local(pending, done, launcher_dict(s), s.workers, log=log) if pending else {}
        failed = [c for c in pending if results.get(c.index, {}).get("rc") != 0]
        rc = aggregate_and_report(plan, log)
    if failed:
        log(f"study: {len(failed)} cell(s) failed: " + "; ".join(
            f"{c.name} (exit {results[c.index]['rc']}, log {results[c.index]['log']})" for c in failed))
        log("study: rerun the same command to retry them (finished cells are skipped)")
    return 1 if failed or rc else 0
