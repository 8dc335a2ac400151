"""Classification metrics (accuracy, balanced accuracy, one-vs-rest and per-label AUC, ECE), optionally weighted.

Every metric is computed from per-image integer *weights* of shape (B, N): row b says how many times each
image is counted. Weights of ones give the ordinary metric; the bootstrap (``bootstrap.py``) passes the
patient-resampled counts, so point estimates and intervals share one implementation and a resample never
has to be materialized. The unweighted values equal scikit-learn's ``roc_auc_score`` and
``balanced_accuracy_score`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from medssl_scale.evaluate.arrays import (
    check_task,
    class_names,
    multiclass_labels,
    multilabel_labels,
    scores_matrix,
)
from medssl_scale.evaluate.errors import EvaluationError

N_BINS = 15  # expected calibration error: equal-width bins on the top-1 confidence


@dataclass(frozen=True)
class MetricSet:
    """Point metrics of one evaluated set.

    values: flat name -> float (NaN where undefined), e.g. ``accuracy``, ``auc_macro``, ``auc/<class>``.
    auc_excluded: classes / labels whose AUC is undefined on this set (absent, or only one of
    positive/negative present) and therefore left out of the macro / mean AUC.
    """

    values: dict[str, float]
    auc_excluded: tuple[str, ...] = field(default=())

    def __getitem__(self, key: str) -> float:
        return self.values[key]


def weighted_binary_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of scores (N,) for the binary target positive (N,) under each weight row (B, N) -> (B,).

    The Mann-Whitney statistic with ties counted one half, which is exactly the trapezoidal area that
    scikit-learn's roc_auc_score computes; an image of weight w counts as w copies. NaN where a row has
    no positive or no negative weight. Vectorized over rows: one sort of the scores, then cumulative sums.
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    n_rows = weights.shape[0]
    if scores.size == 0:
        return np.full(n_rows, np.nan)
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each group of tied scores
    w = weights[:, order]
    pos = positive[order]
    w_all = np.add.reduceat(w, starts, axis=1)                      # (B, G) weight per tie group
    w_pos = np.add.reduceat(w * pos, starts, axis=1) if pos.any() else np.zeros_like(w_all)
    w_neg = w_all - w_pos
    neg_below = np.cumsum(w_neg, axis=1) - w_neg                     # negatives strictly below each group
    num = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
    den = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where nothing is defined (no warning)."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=-1)
    total = np.where(defined, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n), dtype=np.float64)


def _checked_weights(weights: Any, n: int) -> np.ndarray:
    if weights is None:
        return _ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != n:
        raise EvaluationError(f"weights must have shape (B, N={n}), got {tuple(w.shape)}")
    return w


def ece_bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each confidence (N,) in n_bins equal-width bins (lo, hi] of [0, 1]; 0 itself falls in bin 0."""
    if n_bins < 1:
        raise EvaluationError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, n_bins - 1)


def _weighted_ece(confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE = sum_b (n_b / n) |acc_b - conf_b| = sum_b |sum_b correct - sum_b confidence| / n, per row -> (B,)."""
    onehot = ece_bin_index(confidence, n_bins)[:, None] == np.arange(n_bins)[None, :]   # (N, bins)
    gap = onehot * (correct.astype(np.float64) - confidence)[:, None]                  # (N, bins)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(weights @ gap).sum(axis=1) / np.maximum(total, 1e-300), np.nan)


def multiclass_arrays(labels: Any, probs: Any, weights: Any = None, *, names: Sequence[str] | None = None,
                      n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Multiclass metrics of labels (N,) int64 and probs (N, C) under weights (B, N) -> name -> (B,).

    Keys: accuracy (top-1), balanced_accuracy (mean recall over the classes present under that row),
    auc_macro (mean one-vs-rest AUC over the classes with both positives and negatives under that row),
    ece (15-bin expected calibration error of the top-1 confidence), auc/<name> per class (NaN if undefined).
    """
    y = multiclass_labels(labels)
    p = scores_matrix(probs, y.shape[0], "probs")
    n, c = p.shape
    if y.size and y.max() >= c:
        raise EvaluationError(f"label {int(y.max())} is out of range for probs with {c} classes")
    names = class_names(names, c)
    w = _checked_weights(weights, n)
    pred = np.argmax(p, axis=1)
    correct = pred == y
    onehot = (y[:, None] == np.arange(c)[None, :]).astype(np.float64)                  # (N, C)
    total = w.sum(axis=1)
    support = w @ onehot                                                              # (B, C)
    hits = w @ (onehot * correct[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(total > 0, (w @ correct.astype(np.float64)) / np.maximum(total, 1e-300), np.nan)
        recall = np.where(support > 0, hits / np.maximum(support, 1e-300), np.nan)
    auc = np.stack([weighted_binary_auc(y == k, p[:, k], w) for k in range(c)], axis=1)  # (B, C)
    out = {
        "accuracy": accuracy,
        "balanced_accuracy": _mean_defined(recall),
        "auc_macro": _mean_defined(auc),
        "ece": _weighted_ece(p[np.arange(n), pred], correct, w, n_bins),
    }
    out.update({f"auc/{name}": auc[:, k] for k, name in enumerate(names)})
    return out


def multilabel_arrays(labels: Any, probs: Any, weights: Any = None, *,
                      names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Multilabel metrics of labels (N, L) in {0, 1, NaN} and probs (N, L) under weights (B, N) -> name -> (B,).

    Keys: auc/<name> per label over the images whose label is not NaN (NaN if that label has no positive or
    no negative there), and auc_mean, the mean of the defined per-label AUCs.
    """
    y = multilabel_labels(labels)
    p = scores_matrix(probs, y.shape[0], "probs")
    if p.shape[1] != y.shape[1]:
        raise EvaluationError(f"probs have {p.shape[1]} labels, labels have {y.shape[1]}")
    names = class_names(names, y.shape[1], "label")
    w = _checked_weights(weights, y.shape[0])
    cols = []
    for k in range(y.shape[1]):
        known = ~np.isnan(y[:, k])
        cols.append(weighted_binary_auc(y[known, k] == 1, p[known, k], w[:, known]))
    auc = np.stack(cols, axis=1) if cols else np.full((w.shape[0], 0), np.nan)
    out = {"auc_mean": _mean_defined(auc)}
    out.update({f"auc/{name}": auc[:, k] for k, name in enumerate(names)})
    return out


def metric_arrays(task: str, labels: Any, scores: Any, weights: Any = None, *,
                  names: Sequence[str] | None = None, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """The task's metrics under weights (B, N) -> name -> (B,); see multiclass_arrays / multilabel_arrays."""
    if check_task(task) == "multiclass":
        return multiclass_arrays(labels, scores, weights, names=names, n_bins=n_bins)
    return multilabel_arrays(labels, scores, weights, names=names)


def _point(arrays: dict[str, np.ndarray]) -> MetricSet:
    values = {k: float(v[0]) for k, v in arrays.items()}
    excluded = tuple(k.split("/", 1)[1] for k, v in values.items() if k.startswith("auc/") and np.isnan(v))
    return MetricSet(values, excluded)


def multiclass_metrics(labels: Any, probs: Any, *, names: Sequence[str] | None = None,
                       n_bins: int = N_BINS) -> MetricSet:
    """Top-1 accuracy, balanced accuracy, macro one-vs-rest AUC and ECE of labels (N,) and probs (N, C).

    Classes absent from the evaluated labels: they have no recall, so balanced accuracy is the mean recall
    over the classes present (scikit-learn's balanced_accuracy_score does the same); their one-vs-rest AUC
    is undefined (NaN), listed in auc_excluded, and auc_macro is the mean over the remaining classes. A
    class that is every image's label is excluded the same way (no negatives).
    """
    return _point(multiclass_arrays(labels, probs, names=names, n_bins=n_bins))


def multilabel_metrics(labels: Any, probs: Any, *, names: Sequence[str] | None = None) -> MetricSet:
    """Per-label AUC (NaN labels masked out per label) and their mean, of labels (N, L) and probs (N, L).

    A label whose known values are all 0 or all 1 (or all NaN) gets AUC NaN, is listed in auc_excluded,
    and is left out of auc_mean.
    """
    return _point(multilabel_arrays(labels, probs, names=names))


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = N_BINS) -> float:
    """ECE of the top-1 prediction of probs (N, C) against labels (N,), n_bins equal-width bins (default 15).

    ECE = sum over bins b of (n_b / N) * |accuracy_b - mean confidence_b|, where the confidence of an
    image is its largest probability and bin b holds confidences in (b/n_bins, (b+1)/n_bins].
    """
    return float(multiclass_arrays(labels, probs, n_bins=n_bins)["ece"][0])


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin statistics for a reliability diagram; bins with no image have NaN accuracy and confidence."""

    edges: np.ndarray       # (n_bins + 1,)
    count: np.ndarray       # (n_bins,) images per bin
    accuracy: np.ndarray    # (n_bins,) top-1 accuracy per bin
    confidence: np.ndarray  # (n_bins,) mean top-1 confidence per bin
    ece: float


def calibration_bins(labels: Any, probs: Any, n_bins: int = N_BINS) -> CalibrationBins:
    """Reliability-diagram statistics of probs (N, C) against labels (N,), the bins of expected_calibration_error."""
    y = multiclass_labels(labels)
    p = scores_matrix(probs, y.shape[0], "probs")
    pred = np.argmax(p, axis=1)
    conf = p[np.arange(p.shape[0]), pred]
    b = ece_bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(b, weights=(pred == y).astype(np.float64), minlength=n_bins) / count
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / count
    acc[count == 0] = np.nan
    mean_conf[count == 0] = np.nan
    return CalibrationBins(np.linspace(0.0, 1.0, n_bins + 1), count, acc, mean_conf,
                           expected_calibration_error(y, p, n_bins))
