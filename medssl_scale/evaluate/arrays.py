"""Conversion and validation of evaluation inputs: labels, scores, features and patient ids."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medssl_scale.evaluate.errors import EvaluationError

TASKS = ("multiclass", "multilabel")


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of x: torch tensors are detached and moved to the CPU, sequences go through np.asarray."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise EvaluationError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    return task


def multiclass_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """labels (N,) integer class indices >= 0 -> int64 (N,)."""
    y = to_numpy(labels)
    if y.ndim != 1:
        raise EvaluationError(f"multiclass {name} must have shape (N,), got {tuple(y.shape)}")
    if y.dtype.kind not in "iub":
        if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            pass  # integral floats are accepted
        else:
            raise EvaluationError(f"multiclass {name} must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise EvaluationError(f"multiclass {name} must be >= 0, got {int(y.min())}")
    return y


def multilabel_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """labels (N, L) with 0, 1 or NaN (missing / uncertain-ignored) -> float64 (N, L)."""
    y = to_numpy(labels)
    if y.ndim != 2:
        raise EvaluationError(f"multilabel {name} must have shape (N, L), got {tuple(y.shape)}")
    y = y.astype(np.float64)
    known = y[~np.isnan(y)]
    if known.size and not np.all((known == 0) | (known == 1)):
        bad = known[(known != 0) & (known != 1)][0]
        raise EvaluationError(f"multilabel {name} must be 0, 1 or NaN, got {bad:g}")
    return y


def task_labels(task: str, labels: Any, name: str = "labels") -> np.ndarray:
    return multiclass_labels(labels, name) if check_task(task) == "multiclass" else multilabel_labels(labels, name)


def scores_matrix(scores: Any, n: int, name: str = "scores") -> np.ndarray:
    """scores (N, C) finite -> float64 (N, C), N checked against the labels."""
    s = to_numpy(scores).astype(np.float64)
    if s.ndim != 2 or s.shape[0] != n:
        raise EvaluationError(f"{name} must have shape (N={n}, C), got {tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        raise EvaluationError(f"{name} must be finite, found NaN or inf")
    return s


def patient_index(patient_ids: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """patient ids (N,) -> (sorted unique ids (P,), patient index of each image (N,) int64)."""
    ids = to_numpy(patient_ids)
    if ids.ndim != 1 or ids.shape[0] != n:
        raise EvaluationError(f"patient_ids must have shape (N={n},), got {tuple(ids.shape)}")
    if n == 0:
        raise EvaluationError("no images: patient_ids is empty")
    ids = ids.astype(str)
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, inverse.astype(np.int64).reshape(-1)


def class_names(names: Sequence[str] | None, count: int, what: str = "class") -> list[str]:
    """The given names, checked against count, or '0', '1', ... when none are given."""
    if names is None:
        return [str(i) for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise EvaluationError(f"got {len(names)} {what} names for {count} {what}es" if what == "class"
                              else f"got {len(names)} {what} names for {count} {what}s")
    return names
