"""Percentile bootstrap confidence intervals that resample patients, not images, for every metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medssl_scale.evaluate.arrays import patient_index, task_labels
from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.metrics import N_BINS, metric_arrays

N_RESAMPLES = 1000
CONFIDENCE = 0.95
_CHUNK_ELEMENTS = 4_000_000  # resamples x images evaluated at once (bounds memory to ~100 MB)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval; n_defined = resamples in which the metric was defined."""

    value: float
    low: float
    high: float
    n_defined: int

    def as_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "low": self.low, "high": self.high, "n_defined": self.n_defined}


def patient_resample_counts(patient_index_of_image: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """How often each image (N,) is counted in each resample, from drawn patient indices (B, P) -> (B, N).

    A patient drawn m times brings all of its images m times.
    """
    n_patients = draws.shape[1]
    offsets = (np.arange(draws.shape[0]) * n_patients)[:, None]
    per_patient = np.bincount((draws + offsets).ravel(), minlength=draws.shape[0] * n_patients)
    per_patient = per_patient.reshape(draws.shape[0], n_patients)
    return per_patient[:, patient_index_of_image]


def bootstrap_metrics(task: str, labels: Any, scores: Any, patient_ids: Any, *,
                      n_resamples: int = N_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE,
                      names: Sequence[str] | None = None, n_bins: int = N_BINS) -> dict[str, Interval]:
    """Every metric of the task (metrics.metric_arrays) with a percentile bootstrap interval over patients.

    labels (N,) int64 or (N, L) float with NaN; scores (N, C) or (N, L); patient_ids (N,) strings.
    Resampling: the P distinct patient ids are sorted; ``np.random.default_rng(seed).integers(0, P,
    size=(n_resamples, P))`` draws the patients of each resample (row b is resample b), and a patient drawn
    m times contributes all its images m times. The interval is the (1 - confidence) / 2 and
    (1 + confidence) / 2 percentiles (numpy's linear interpolation) of the metric over the resamples in
    which it is defined (a resample can lack a class; n_defined counts the others). value is the metric
    on the full set.
    """
    y = task_labels(task, labels)
    _, pidx = patient_index(patient_ids, y.shape[0])
    if int(n_resamples) < 1:
        raise EvaluationError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"confidence must be in (0, 1), got {confidence}")
    point = metric_arrays(task, y, scores, None, names=names, n_bins=n_bins)
    n_patients = int(pidx.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(y.shape[0], n_patients))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in point}
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        counts = patient_resample_counts(pidx, rng.integers(0, n_patients, size=(b, n_patients)))
        for k, v in metric_arrays(task, y, scores, counts, names=names, n_bins=n_bins).items():
            parts[k].append(v)
        done += b
    q = 100.0 * np.array([(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    out = {}
    for k, v in point.items():
        values = np.concatenate(parts[k])
        defined = values[~np.isnan(values)]
        if np.isnan(v[0]) or defined.size == 0:
            low = high = float("nan")
        else:
            low, high = (float(x) for x in np.percentile(defined, q))
        out[k] = Interval(float(v[0]), low, high, int(defined.size))
    return out
