"""Cosine kNN on L2-normalized cached features, with DINO / solo-learn weighted voting.

For a query q and the k training features t_j most similar to it (cosine similarity s_j = q.t_j of the
L2-normalized features), each neighbour votes with weight exp(s_j / T):
  multiclass  score_c = sum_j w_j [y_j = c] / sum_j w_j                         (N, C), rows sum to 1
  multilabel  score_l = sum_j w_j [y_jl known] y_jl / sum_j w_j [y_jl known]   (N, L)
DINO's eval_knn.py sums exp(s_j / T) one-hot votes without dividing; dividing by the total weight keeps
the ranking within a row (top-1 unchanged) and makes the scores probabilities, usable for AUC and ECE.
A multilabel query whose k neighbours all have label l unknown gets the training prevalence of l.
Defaults k = 20, T = 0.07 are DINO's; pass them explicitly and record them (a silent default change once
made published kNN numbers irreproducible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from medssl_scale.evaluate.arrays import check_task, task_labels, to_numpy
from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.metrics import metric_arrays

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def _features(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise EvaluationError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return torch.nn.functional.normalize(t.detach().to(device if device is not None else t.device), dim=1)


def _neighbours(train: torch.Tensor, query: torch.Tensor, k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities (N, k), descending, and training indices (N, k) of normalized features."""
    sims, idx = [], []
    for start in range(0, query.shape[0], chunk_size):
        s, i = torch.topk(query[start:start + chunk_size] @ train.T, k, dim=1, largest=True, sorted=True)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def _vote(task: str, sims: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, n_out: int,
          temperature: float) -> torch.Tensor:
    # exp((s - s_max) / T) is exp(s / T) times a per-query constant that cancels in the normalized vote
    w = torch.exp((sims - sims[:, :1]) / temperature)                                    # (N, k)
    if task == "multiclass":
        votes = torch.zeros(sims.shape[0], n_out, dtype=w.dtype, device=w.device)
        votes.scatter_add_(1, labels[idx], w)
        return votes / w.sum(dim=1, keepdim=True)
    y = labels[idx]                                                                       # (N, k, L)
    known = ~torch.isnan(y)
    wk = w[:, :, None] * known
    den = wk.sum(dim=1)
    num = (wk * torch.where(known, y, 0.0)).sum(dim=1)
    lab_known = ~torch.isnan(labels)
    prevalence = torch.where(lab_known, labels, 0.0).sum(0) / lab_known.sum(0).clamp(min=1)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), prevalence.expand_as(num))


def _prepare(train_features: Any, train_labels: Any, query_features: Any, task: str,
             num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    check_task(task)
    train = _features(train_features, "train_features")
    query = _features(query_features, "query_features", train.device).to(train.dtype)
    if query.shape[1] != train.shape[1]:
        raise EvaluationError(f"query_features have {query.shape[1]} dimensions, train_features have {train.shape[1]}")
    y = task_labels(task, train_labels, "train_labels")
    if y.shape[0] != train.shape[0]:
        raise EvaluationError(f"train_labels have {y.shape[0]} rows, train_features have {train.shape[0]}")
    if task == "multiclass":
        n_out = int(num_classes) if num_classes is not None else int(y.max()) + 1
        if y.max() >= n_out:
            raise EvaluationError(f"label {int(y.max())} is out of range for {n_out} classes")
        labels = torch.as_tensor(y, device=train.device)
    else:
        n_out = y.shape[1]
        labels = torch.as_tensor(y, device=train.device, dtype=train.dtype)
    return train, query, labels, n_out


def _check_k_t(k: int, temperature: float, n_train: int) -> int:
    if int(k) != k or k < 1:
        raise EvaluationError(f"k must be an integer >= 1, got {k}")
    if not temperature > 0:
        raise EvaluationError(f"temperature must be > 0, got {temperature}")
    return min(int(k), n_train)


@torch.no_grad()
def knn_scores(train_features: Any, train_labels: Any, query_features: Any, *, task: str = "multiclass",
               k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
               chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (N, C) (multiclass, rows sum to 1) or label scores (N, L) of query features (N, D).

    train_features (M, D), train_labels (M,) int64 or (M, L) float with NaN; k is capped at M. Runs on the
    training features' device, chunk_size queries at a time (memory chunk_size x M similarities).
    """
    train, query, labels, n_out = _prepare(train_features, train_labels, query_features, task, num_classes)
    k = _check_k_t(k, temperature, train.shape[0])
    sims, idx = _neighbours(train, query, k, chunk_size)
    return _vote(task, sims, idx, labels, n_out, float(temperature))


@dataclass
class KnnSweep:
    """The (k, temperature) chosen on validation, and every pair tried."""

    k: int
    temperature: float
    metric: str
    value: float
    table: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def sweep_knn(train_features: Any, train_labels: Any, val_features: Any, val_labels: Any, *,
              task: str = "multiclass", ks: Sequence[int] = (10, 20, 50, 100),
              temperatures: Sequence[float] = (0.02, 0.07, 0.2), select_metric: str | None = None,
              num_classes: int | None = None, names: Sequence[str] | None = None,
              chunk_size: int = 1024) -> KnnSweep:
    """Choose k and temperature on validation (one neighbour search at the largest k); ties keep the first pair.

    select_metric defaults to accuracy (multiclass) or auc_mean (multilabel). Pairs are tried in the
    order ks x temperatures as given.
    """
    train, val, labels, n_out = _prepare(train_features, train_labels, val_features, task, num_classes)
    metric = select_metric or ("accuracy" if task == "multiclass" else "auc_mean")
    yv = task_labels(task, val_labels, "val_labels")
    if yv.shape[0] != val.shape[0]:
        raise EvaluationError(f"val_labels have {yv.shape[0]} rows, val_features have {val.shape[0]}")
    if not ks or not temperatures:
        raise EvaluationError("ks and temperatures must be non-empty")
    capped = [_check_k_t(k, t, train.shape[0]) for k in ks for t in temperatures]
    sims, idx = _neighbours(train, val, max(capped), chunk_size)
    best, table = None, []
    for k in ks:
        kk = min(int(k), train.shape[0])
        for t in temperatures:
            scores = _vote(task, sims[:, :kk], idx[:, :kk], labels, n_out, float(t))
            values = metric_arrays(task, yv, to_numpy(scores), names=names)
            if metric not in values:
                raise EvaluationError(f"select_metric {metric!r} is not a {task} metric; one of {', '.join(values)}")
            value = float(values[metric][0])
            table.append({"k": kk, "temperature": float(t), metric: value})
            if best is None or (not np.isnan(value) and (np.isnan(best[2]) or value > best[2])):
                best = (kk, float(t), value)
    return KnnSweep(best[0], best[1], metric, best[2], table)
