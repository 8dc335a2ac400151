"""From the cells' metrics.json to the study's numbers: one row per cell, mean and standard deviation over
seeds, and the headline.

The headline, per protocol and initialization: the smallest studied fraction whose mean over seeds reaches
the baseline's mean at fraction 1.0 (>=; <= for ECE, where lower is better), with the baseline's spread and
interval at 1.0, or "not reached". The standard deviation is the sample one (ddof 1) over the seeds that
finished; a single seed has none. The intervals shown for a mean are the 95% patient-bootstrap intervals
of its runs, averaged over seeds (each run's own interval is in label_efficiency.csv).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from .cells import Cell, metrics_of, read_json
from .runner import RESUMABLE, status_of

LOWER_IS_BETTER = ("ece",)
BASE_COLUMNS = ["init", "protocol", "fraction", "seed", "status", "metric", "value", "ci_low", "ci_high",
                "n_train_images", "n_train_patients", "n_val_images", "n_test_images", "n_test_patients",
                "encoder", "encoder_hash", "config_hash", "cell", "error"]
_TOL = 1e-12  # float noise only: the baseline's own mean at 1.0 must count as reaching itself


def default_metric(task_type: str) -> str:
    return "auc_mean" if task_type == "multilabel" else "balanced_accuracy"


def metric_names(task_type: str, names: list[str]) -> list[str]:
    head = ["auc_mean", "ece"] if task_type == "multilabel" else ["accuracy", "balanced_accuracy", "auc_macro", "ece"]
    return head + [f"auc/{n}" for n in names]


def cell_status(cell: Cell) -> tuple[str, dict | None, str]:
    """(done | failed | stopped | not run, the metrics.json, the failure line); stopped: a fine-tune that a
    signal stopped after saving its checkpoint (the next run resumes it)."""
    m = metrics_of(cell)
    if m is not None:
        return "done", m, ""
    prepared = read_json(cell.dir / "cell.json") or {}
    st = status_of(cell)
    if prepared.get("config_hash") == cell.config_hash and st and st.get("rc") != 0:
        if st["rc"] == RESUMABLE:
            return "stopped", None, "exit 99: stopped by a signal, checkpoint saved; the next run resumes it"
        return "failed", None, f"exit {st['rc']}: {st.get('error', '')}"
    return "not run", None, ""


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def collect(cells: list[Cell], metric: str, study_dir: str | Path) -> list[dict]:
    """One row per cell, in cell order: its status and, when done, every metric with its interval."""
    rows = []
    for cell in cells:
        status, m, error = cell_status(cell)
        row = {"init": cell.init, "protocol": cell.protocol, "fraction": cell.fraction, "seed": cell.seed,
               "status": status, "metric": metric, "cell": str(Path(cell.dir).relative_to(study_dir)),
               "error": error, "log": str(Path(cell.dir) / "log.txt"), "metrics": {}}
        if m is not None:
            block = m.get("metrics", {})
            row["metrics"] = {k: v for k, v in block.items() if isinstance(v, dict) and "value" in v}
            mine = row["metrics"].get(metric)
            if mine is None:
                row["error"] = f"metrics.json has no {metric!r} (it has {', '.join(row['metrics'])})"
            else:
                row.update(value=_num(mine.get("value")), ci_low=_num(mine.get("low")), ci_high=_num(mine.get("high")))
                if row["value"] is None:
                    row["error"] = f"{metric} is null in metrics.json (undefined on this test set)"
            for key in ("n_train_images", "n_train_patients", "n_val_images", "n_test_images", "n_test_patients",
                        "encoder", "encoder_hash", "config_hash"):
                row[key] = m.get(key)
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    from ..finetune.outputs import _atomic  # the eval job's atomic writer: readers never see a partial file

    names: list[str] = []
    for r in rows:
        names += [k for k in r["metrics"] if k not in names]
    names.sort(key=lambda k: "/" in k)  # stable: headline metrics first, then auc/<class>
    columns = BASE_COLUMNS + [f"{n}{s}" for n in names for s in ("", "_low", "_high")]
    with _atomic(Path(path), "w") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {k: ("" if r.get(k) is None else r.get(k)) for k in BASE_COLUMNS}
            for n, v in r["metrics"].items():
                for s, key in (("", "value"), ("_low", "low"), ("_high", "high")):
                    out[f"{n}{s}"] = "" if _num(v.get(key)) is None else repr(float(v[key]))
            for key in ("value", "ci_low", "ci_high"):
                if isinstance(out[key], float):
                    out[key] = repr(out[key])
            w.writerow(out)


@dataclass
class Point:
    """One (protocol, init, fraction) over its seeds."""

    protocol: str
    init: str
    fraction: float
    n: int                 # seeds that finished with a value
    expected: int          # seeds in the study
    mean: float
    std: float | None      # sample standard deviation; None with one seed
    low: float | None      # the runs' 95% bootstrap interval bounds, averaged over seeds
    high: float | None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(rows: list[dict], expected_seeds: int) -> list[Point]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done" and r.get("value") is not None:
            groups.setdefault((r["protocol"], r["init"], r["fraction"]), []).append(r)
    out = []
    for (protocol, init, fraction), rs in groups.items():
        v = [r["value"] for r in rs]
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
        lows = [r["ci_low"] for r in rs if r.get("ci_low") is not None]
        highs = [r["ci_high"] for r in rs if r.get("ci_high") is not None]
        out.append(Point(protocol, init, fraction, len(v), expected_seeds, mean, std,
                         _mean(lows) if len(lows) == len(v) else None, _mean(highs) if len(highs) == len(v) else None))
    return sorted(out, key=lambda p: (p.protocol, p.init, p.fraction))


@dataclass
class Headline:
    protocol: str
    init: str
    baseline: str
    target: Point | None           # the baseline at fraction 1.0
    reached: Point | None          # the init at the smallest fraction whose mean reaches the target
    best: Point | None             # the init's best mean (for "not reached")
    note: str = ""

    @property
    def fraction(self) -> float | None:
        return self.reached.fraction if self.reached else None


def headlines(points: list[Point], inits: list[str], protocols: list[str], baseline: str,
              metric: str) -> list[Headline]:
    lower = metric in LOWER_IS_BETTER
    at = {(p.protocol, p.init, p.fraction): p for p in points}
    out = []
    for protocol in protocols:
        target = at.get((protocol, baseline, 1.0))
        for init in inits:
            mine = sorted((p for p in points if p.protocol == protocol and p.init == init), key=lambda p: p.fraction)
            best = (min if lower else max)(mine, key=lambda p: p.mean) if mine else None
            if target is None:
                out.append(Headline(protocol, init, baseline, None, None, best,
                                    f"no result for {baseline} at fraction 1.0 (the headline needs it)"))
                continue
            def reaches(p: Point) -> bool:
                return p.mean <= target.mean + _TOL if lower else p.mean >= target.mean - _TOL

            reached = next((p for p in mine if reaches(p)), None)
            note = "" if reached else ("no finished cells" if not mine else "not reached")
            out.append(Headline(protocol, init, baseline, target, reached, best, note))
    return out
