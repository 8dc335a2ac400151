"""What an evaluation run (linear probe, kNN, fine-tune) writes into its run folder, and its console summary.

  metrics.json           the run's meta plus the metrics block of evaluate_predictions (NaN written as null)
  predictions.csv        one row per test image, sorted by sample_id, probabilities at full precision
  confusion_matrix.png   multiclass only: counts, colored by the fraction of the true class
  reliability.png        accuracy per confidence bin against the diagonal, ECE in the title

The metrics themselves come from medssl_scale.evaluate (metrics, bootstrap); the only metric defined here is
the pooled binary ECE of multilabel predictions, which that library lacks (see pooled_binary_ece).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from medssl_scale.evaluate.arrays import (check_task, class_names, multiclass_labels, multilabel_labels,
                                          patient_index, scores_matrix, task_labels)
from medssl_scale.evaluate.bootstrap import CONFIDENCE, Interval, bootstrap_metrics, patient_resample_counts
from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.metrics import (N_BINS, CalibrationBins, calibration_bins, ece_bin_index,
                                           multiclass_metrics, multilabel_metrics)

_CHUNK_ELEMENTS = 4_000_000  # resamples x images per bootstrap chunk, as in evaluate.bootstrap


# ---- pooled binary ECE (multilabel) ---------------------------------------------------------------------

def _pooled(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The known (image, label) pairs: their 0/1 targets (K,), probabilities (K,), image index (K,), and N."""
    y = multilabel_labels(labels)
    p = scores_matrix(probs, y.shape[0], "probs")
    if p.shape[1] != y.shape[1]:
        raise EvaluationError(f"probs have {p.shape[1]} labels, labels have {y.shape[1]}")
    known = ~np.isnan(y)
    return y[known], p[known], np.nonzero(known)[0], y.shape[0]


def pooled_ece_arrays(labels: Any, probs: Any, weights: Any = None, n_bins: int = N_BINS) -> np.ndarray:
    """pooled_binary_ece under per-image weights (B, N) (bootstrap counts; None = ones) -> (B,).

    Per image and bin, the sum of (target - probability) over its known labels is one (N, bins) matrix, so
    every resample is one matrix product (resamples are never materialized).
    """
    t, p, image, n = _pooled(labels, probs)
    gap = np.zeros((n, n_bins))
    np.add.at(gap, (image, ece_bin_index(p, n_bins)), t - p)
    n_known = np.bincount(image, minlength=n).astype(np.float64)
    w = np.ones((1, n)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    total = w @ n_known
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(w @ gap).sum(axis=1) / np.maximum(total, 1e-300), np.nan)


def pooled_binary_ece(labels: Any, probs: Any, n_bins: int = N_BINS) -> float:
    """ECE of multilabel sigmoid probabilities, pooled over every known (image, label) pair.

    Each pair with a non-NaN label is one binary prediction: confidence = its probability p of the label
    being present, outcome = the 0/1 label. With the K pairs in n_bins equal-width bins of p (the bins of
    metrics.ece_bin_index: (b/n_bins, (b+1)/n_bins], 0 in bin 0):
        ECE = sum_b (n_b / K) * |positive_rate_b - mean_p_b| = sum_b |sum_{k in b} (y_k - p_k)| / K.
    This calibrates p itself (the fraction of positives vs the predicted probability, as in scikit-learn's
    calibration_curve), not max(p, 1 - p). NaN when no label is known.
    """
    return float(pooled_ece_arrays(labels, probs, None, n_bins)[0])


def pooled_calibration_bins(labels: Any, probs: Any, n_bins: int = N_BINS) -> CalibrationBins:
    """Reliability statistics of pooled_binary_ece: accuracy = fraction of positives, confidence = mean p."""
    t, p, _, _ = _pooled(labels, probs)
    b = ece_bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, np.bincount(b, weights=t, minlength=n_bins) / count, np.nan)
        conf = np.where(count > 0, np.bincount(b, weights=p, minlength=n_bins) / count, np.nan)
    return CalibrationBins(np.linspace(0.0, 1.0, n_bins + 1), count, acc, conf,
                           pooled_binary_ece(labels, probs, n_bins))


def _pooled_ece_interval(labels: np.ndarray, probs: np.ndarray, patient_ids: Any, n_resamples: int,
                         seed: int) -> Interval:
    """bootstrap_metrics' protocol for the one metric it lacks: the same seeded patient draws (row b of
    default_rng(seed).integers(0, P, (n_resamples, P)); chunking does not change the stream), the same
    percentiles over the resamples where the metric is defined."""
    _, pidx = patient_index(patient_ids, labels.shape[0])
    n_patients = int(pidx.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(labels.shape[0], n_patients))
    parts = []
    for done in range(0, n_resamples, chunk):
        draws = rng.integers(0, n_patients, size=(min(chunk, n_resamples - done), n_patients))
        parts.append(pooled_ece_arrays(labels, probs, patient_resample_counts(pidx, draws)))
    values = np.concatenate(parts)
    defined = values[~np.isnan(values)]
    value = pooled_binary_ece(labels, probs)
    if math.isnan(value) or defined.size == 0:
        return Interval(value, math.nan, math.nan, int(defined.size))
    q = 100.0 * np.array([(1.0 - CONFIDENCE) / 2.0, (1.0 + CONFIDENCE) / 2.0])
    low, high = (float(x) for x in np.percentile(defined, q))
    return Interval(value, low, high, int(defined.size))


# ---- metrics.json ---------------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays unwrapped, tuples as lists, NaN and inf as None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x) if isinstance(x, Path) else x


def evaluate_predictions(task: str, labels: Any, scores: Any, patient_ids: Any, *, names: Sequence[str] | None,
                         n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The metrics block: every metric of the task as {"value", "low", "high", "n_defined"} with its 95%
    patient-bootstrap interval (evaluate.bootstrap), headline metrics first, then auc/<name>; multilabel
    adds "ece" (pooled_binary_ece). Also auc_excluded, n_images, n_patients and the bootstrap settings.
    Undefined values are None (null in JSON)."""
    y = task_labels(task, labels)
    s = scores_matrix(scores, y.shape[0])
    ids, _ = patient_index(patient_ids, y.shape[0])
    intervals = bootstrap_metrics(task, y, s, patient_ids, n_resamples=n_resamples, seed=seed, names=names)
    if task == "multiclass":
        point = multiclass_metrics(y, s, names=names)
    else:
        point = multilabel_metrics(y, s, names=names)
        intervals["ece"] = _pooled_ece_interval(y, s, patient_ids, int(n_resamples), seed)
    order = sorted(intervals, key=lambda k: "/" in k)  # stable: headline metrics, then per-class AUCs
    block: dict[str, Any] = {k: _jsonable(intervals[k].as_dict()) for k in order}
    block.update(auc_excluded=list(point.auc_excluded), n_images=int(y.shape[0]), n_patients=int(ids.shape[0]),
                 bootstrap={"n_resamples": int(n_resamples), "seed": int(seed), "confidence": CONFIDENCE,
                            "unit": "patient"})
    return block


@contextlib.contextmanager
def _atomic(path: Path, mode: str) -> Iterator[Any]:
    """A file written next to path and renamed onto it: readers never see a partial file. (Not mkstemp:
    its 0600 mode would hide the results from the rest of the group.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_metrics_json(path: str | Path, metrics_block: dict, meta: dict) -> dict:
    """Write {**meta, "metrics": metrics_block} as sorted, indented JSON (NaN as null), atomically; return it."""
    result = _jsonable({**meta, "metrics": metrics_block})
    with _atomic(Path(path), "w") as f:
        f.write(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return result


# ---- predictions.csv ------------------------------------------------------------------------------------

def write_predictions_csv(path: str | Path, *, task: str, names: Sequence[str] | None, sample_ids: Sequence[str],
                          patient_ids: Sequence[str], sources: Sequence[str], labels: Any, scores: Any) -> None:
    """One row per image, sorted by sample_id (so 1- and 2-process runs write the same file): sample_id,
    patient_id, source, label (class name) or label/<name> (1, 0, empty for NaN), prob/<name> (repr: exact
    round trip), and for multiclass predicted (arg-max class name, ties to the lower index)."""
    y = task_labels(task, labels)
    s = scores_matrix(scores, y.shape[0])
    names = class_names(names, s.shape[1], "class" if task == "multiclass" else "label")
    cols = [list(map(str, c)) for c in (sample_ids, patient_ids, sources)]
    if any(len(c) != y.shape[0] for c in cols):
        raise EvaluationError(f"sample_ids, patient_ids and sources must each have N={y.shape[0]} entries")
    if len(set(cols[0])) != len(cols[0]):
        raise EvaluationError("sample_ids must be unique (drop the distributed sampler's padding first)")
    if task == "multiclass" and y.size and y.max() >= len(names):
        raise EvaluationError(f"label {int(y.max())} is out of range for {len(names)} classes")
    multiclass = task == "multiclass"
    header = ["sample_id", "patient_id", "source"] + (["label"] if multiclass else [f"label/{n}" for n in names])
    header += [f"prob/{n}" for n in names] + (["predicted"] if multiclass else [])
    with _atomic(Path(path), "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i in sorted(range(y.shape[0]), key=cols[0].__getitem__):
            label = [names[y[i]]] if multiclass else ["" if math.isnan(v) else str(int(v)) for v in y[i]]
            row = [c[i] for c in cols] + label + [repr(float(v)) for v in s[i]]
            w.writerow(row + ([names[int(np.argmax(s[i]))]] if multiclass else []))


# ---- plots (Figure + Agg canvas: no pyplot global state, no display needed) -----------------------------

def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with _atomic(Path(path), "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def plot_confusion_matrix(path: str | Path, labels: Any, probs: Any, names: Sequence[str] | None) -> None:
    """Counts of (true, arg-max predicted) class, colored by the fraction of the true class (row)."""
    y = multiclass_labels(labels)
    p = scores_matrix(probs, y.shape[0], "probs")
    accuracy = multiclass_metrics(y, p, names=names)["accuracy"]  # also checks names and label range
    c = p.shape[1]
    names = class_names(names, c)
    cm = np.bincount(y * c + np.argmax(p, axis=1), minlength=c * c).reshape(c, c)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(4.5, 0.55 * c + 2.5)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    size = max(5, min(10, 120 // c))
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=size,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=size)
    ax.set_yticks(range(c), names, fontsize=size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix: accuracy {accuracy:.4f} ({y.shape[0]} images)")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    _save(fig, path)


def plot_reliability(path: str | Path, task: str, labels: Any, probs: Any) -> None:
    """Accuracy per confidence bin (15 bins) against the diagonal; multilabel: fraction of positives per bin
    of the pooled known (image, label) probabilities (pooled_calibration_bins)."""
    multiclass = check_task(task) == "multiclass"
    bins = calibration_bins(labels, probs) if multiclass else pooled_calibration_bins(labels, probs)
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot()
    width = bins.edges[1] - bins.edges[0]
    ax.bar(bins.edges[:-1], np.nan_to_num(bins.accuracy), width=width, align="edge", color="tab:blue",
           edgecolor="black", alpha=0.8, label="accuracy" if multiclass else "fraction positive")
    ax.plot(bins.confidence, bins.accuracy, "o", color="tab:red", markersize=4, label="bin (mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)" if multiclass else "predicted probability (pooled labels)")
    ax.set_ylabel("accuracy" if multiclass else "fraction positive")
    ece = "n/a" if math.isnan(bins.ece) else f"{bins.ece:.4f}"
    ax.set_title(f"Reliability: ECE {ece} ({len(bins.count)} bins, {int(bins.count.sum())} predictions)")
    ax.legend(loc="upper left")
    _save(fig, path)


# ---- console summary ------------------------------------------------------------------------------------

def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def summary_table(metrics_block: dict, title: str) -> Table:
    """metric | value | 95% CI, headline metrics first, then per-class AUCs; counts and settings as caption."""
    rows = [k for k, v in metrics_block.items() if isinstance(v, dict) and "value" in v]
    table = Table(title=title)
    for name, justify in (("metric", "left"), ("value", "right"), ("95% CI", "right")):
        table.add_column(name, justify=justify)
    for k in sorted(rows, key=lambda k: "/" in k):
        v = metrics_block[k]
        ci = "n/a" if v["low"] is None or v["high"] is None else f"[{_fmt(v['low'])}, {_fmt(v['high'])}]"
        table.add_row(k, _fmt(v["value"]), ci)
    boot = metrics_block.get("bootstrap", {})
    caption = (f"{metrics_block.get('n_images')} images, {metrics_block.get('n_patients')} patients; "
               f"{boot.get('n_resamples')} patient bootstrap resamples, seed {boot.get('seed')}")
    if metrics_block.get("auc_excluded"):
        caption += f"; AUC undefined for: {', '.join(metrics_block['auc_excluded'])}"
    table.caption = caption
    return table


def print_summary(metrics_block: dict, title: str, console: Console | None = None) -> None:
    (console or Console()).print(summary_table(metrics_block, title))
