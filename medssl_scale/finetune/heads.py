"""The frozen-feature protocols: a linear probe or a kNN classifier, chosen on validation, scored on test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..evaluate.knn import knn_scores, sweep_knn
from ..evaluate.probe import fit_probe_sweep
from .config import EvalConfig


@dataclass
class HeadResult:
    test_scores: np.ndarray      # (N_test, C) probabilities or (N_test, L) label scores
    selection: dict              # what was chosen on validation, and the whole sweep
    head: dict                   # the model.pt head (see classifier.py)


def fit_linear(cfg: EvalConfig, task: str, names: list[str], xtr, ytr, xva, yva, xte) -> HeadResult:
    sweep = fit_probe_sweep(xtr, ytr, xva, yva, task=task, l2_grid=cfg.linear.l2_grid,
                            select_metric=cfg.report.select_metric, num_outputs=len(names), names=names,
                            max_iter=cfg.linear.max_iter)
    p = sweep.probe
    scores = p.predict_proba(xte).double().cpu().numpy()
    # Fold the standardization into one linear layer: ((x - m) / s) W + b = x (W / s) + (b - (m / s) W).
    w = (p.weight / p.std[:, None]).double()
    b = (p.bias - (p.mean / p.std) @ p.weight).double()
    head = {"weight": w.T.float().contiguous(), "bias": b.float()}
    grid = sorted(cfg.linear.l2_grid)
    # A strength at the end of the grid may not be the best one: widen linear.l2_grid and look again.
    edge = "largest" if sweep.l2 == grid[-1] else "smallest" if sweep.l2 == grid[0] else None
    selection = {"metric": sweep.metric, "value": sweep.value, "l2": sweep.l2,
                 "C_sklearn": 1.0 / (sweep.l2 * len(xtr)), "n_iter": p.n_iter, "l2_at_grid_edge": edge,
                 "sweep": sweep.table}
    return HeadResult(scores, selection, head)


def fit_knn(cfg: EvalConfig, task: str, names: list[str], xtr, ytr, xva, yva, xte) -> HeadResult:
    sweep = sweep_knn(xtr, ytr, xva, yva, task=task, ks=cfg.knn.k, temperatures=cfg.knn.temperature,
                      select_metric=cfg.report.select_metric, num_classes=len(names), names=names)
    scores = knn_scores(xtr, ytr, xte, task=task, k=sweep.k, temperature=sweep.temperature,
                        num_classes=len(names)).double().cpu().numpy()
    head = {"features": torch.as_tensor(np.asarray(xtr, dtype=np.float32)), "labels": torch.as_tensor(ytr),
            "k": sweep.k, "temperature": sweep.temperature}
    selection = {"metric": sweep.metric, "value": sweep.value, "k": sweep.k, "temperature": sweep.temperature,
                 "sweep": sweep.table}
    return HeadResult(scores, selection, head)


FITS = {"linear": fit_linear, "knn": fit_knn}
