"""Linear probe: L-BFGS logistic regression on cached features, its L2 strength chosen on validation.

Objective, on features standardized with the training statistics (x - mean) / std:
  multiclass, C >= 3   mean_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||^2          W (D, C)
  multiclass, C == 2   mean_i BCE(sigmoid(x_i w + b), y_i) + (l2 / 2) ||w||^2          w (D, 1)
  multilabel           sum_l [ mean_{i: y_il known} BCE(sigmoid(x_i w_l + b_l), y_il) + (l2 / 2) ||w_l||^2 ]
The bias is not penalized. This is scikit-learn's LogisticRegression(solver="lbfgs") objective divided
by C * N, so ``l2 = 1 / (C * N_train)``, i.e. ``C = 1 / (l2 * N_train)``; for multilabel, label l is
LogisticRegression fit on its known rows with C_l = 1 / (l2 * n_l). The standardization statistics are
over all training rows (for multilabel too). A class absent from the training labels gets logit -inf
(probability 0); scikit-learn would not know it at all. Two classes (C == 2) use one logit, as
scikit-learn does (a two-column softmax with the same penalty would be a different model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from medssl_scale.evaluate.arrays import check_task, task_labels, to_numpy
from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.metrics import metric_arrays

DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-6, 0, 13))  # 1e-6 ... 1, half-decade steps
DEFAULT_SELECT = {"multiclass": "accuracy", "multilabel": "auc_mean"}


def _features(x: Any, name: str, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise EvaluationError(f"{name} must have shape (N, D), got {tuple(t.shape)}")
    t = t.detach().to(device=device if device is not None else t.device, dtype=dtype)
    if not torch.isfinite(t).all():
        raise EvaluationError(f"{name} must be finite, found NaN or inf")
    return t


@dataclass
class LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ weight + bias; weight (D, K), K = C, 1 (binary) or L."""

    task: str
    num_outputs: int           # C classes (multiclass) or L labels (multilabel)
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor         # (D,) training-feature mean
    std: torch.Tensor          # (D,) training-feature std (population; 1 where a feature is constant)
    l2: float
    n_iter: int = 0
    grad_max: float = float("nan")  # max |gradient| of the objective at the returned weights

    def logits(self, features: Any) -> torch.Tensor:
        """features (N, D) -> logits (N, K)."""
        x = _features(features, "features", self.weight.dtype, self.weight.device)
        if x.shape[1] != self.weight.shape[0]:
            raise EvaluationError(f"features have {x.shape[1]} dimensions, the probe was fit on {self.weight.shape[0]}")
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    @torch.no_grad()
    def predict_proba(self, features: Any) -> torch.Tensor:
        """features (N, D) -> probabilities (N, C) summing to 1 (multiclass) or (N, L) per label (multilabel)."""
        z = self.logits(features)
        if self.task == "multilabel":
            return torch.sigmoid(z)
        if self.weight.shape[1] == 1:
            return torch.cat([torch.sigmoid(-z), torch.sigmoid(z)], dim=1)
        return torch.softmax(z, dim=1)

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "num_outputs": self.num_outputs, "weight": self.weight.cpu(),
                "bias": self.bias.cpu(), "mean": self.mean.cpu(), "std": self.std.cpu(), "l2": self.l2}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LinearProbe":
        return cls(state["task"], int(state["num_outputs"]), state["weight"], state["bias"], state["mean"],
                   state["std"], float(state["l2"]))


def standardizer(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training statistics (mean (D,), std (D,)) of features (N, D); constant features get std 1."""
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-12 * (1.0 + mean.abs()), std, torch.ones_like(std))


def _targets(task: str, labels: Any, n: int, num_outputs: int | None, device: torch.device,
             dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    y = task_labels(task, labels)
    if y.shape[0] != n:
        raise EvaluationError(f"labels have {y.shape[0]} rows, features have {n}")
    if task == "multiclass":
        c = int(num_outputs) if num_outputs is not None else int(y.max()) + 1
        if c < 2:
            raise EvaluationError(f"a multiclass probe needs at least 2 classes, got {c}")
        if y.max() >= c:
            raise EvaluationError(f"label {int(y.max())} is out of range for {c} classes")
        if np.unique(y).size < 2:
            raise EvaluationError(f"the training labels hold a single class ({int(y[0])}); a probe needs two")
        return torch.as_tensor(y, device=device), c
    return torch.as_tensor(y, device=device, dtype=dtype), y.shape[1]


class _Problem:
    """The standardized training problem, kept as x (N, D) and x^T (D, N) so both products are plain GEMMs.

    Gradients are written by hand (no autograd graph per evaluation). Two layouts, both exact:
      rows     z = x W + b (N, K), dW = x^T G (D, K): the faster one for float64 (and on GPUs);
      columns  z^T = W^T x^T + b (K, N), dW^T = G^T x (K, D): several times faster for float32 with MKL,
               whose sgemm is quick when the small dimension K comes first.
    """

    def __init__(self, task: str, x: torch.Tensor, y: torch.Tensor, k: int):
        self.task, self.x, self.xt, self.k, self.labels = task, x, x.T.contiguous(), k, y
        self.columns = x.dtype == torch.float32 and x.device.type == "cpu"
        n = x.shape[0]
        self.softmax = task == "multiclass" and k > 1
        if self.softmax:
            self.y = y.reshape(1, n) if self.columns else y.reshape(n, 1)
            self.minus_ones = torch.full_like(self.y, -1.0, dtype=x.dtype)
            # a class with no training image gets logit -inf: probability 0, weights left at 0
            absent = torch.bincount(y, minlength=k) == 0
            self.offset = torch.where(absent, -torch.inf, 0.0).to(x.dtype) if absent.any() else None
        else:
            t = (y == 1).to(x.dtype).reshape(n, 1) if task == "multiclass" else y
            known = ~torch.isnan(t)
            scale = 1.0 / known.sum(dim=0, keepdim=True).clamp(min=1).to(x.dtype)        # 1 / n_l, (1, L)
            t, known = torch.where(known, t, 0.0), known.to(x.dtype)
            if self.columns:
                t, known, scale = t.T.contiguous(), known.T.contiguous(), scale.T.contiguous()
            self.t, self.known_scaled = t, known * scale

    def to(self, dtype: torch.dtype) -> "_Problem":
        """The same problem in another dtype (layout chosen again)."""
        y = self.labels if self.labels.dtype == torch.int64 else self.labels.to(dtype)
        return _Problem(self.task, self.x.to(dtype), y, self.k)

    def init(self, w: torch.Tensor | None) -> torch.Tensor:
        """The weight parameter in this layout, from W (D, K) or zeros."""
        if w is None:
            shape = (self.k, self.x.shape[1]) if self.columns else (self.x.shape[1], self.k)
            return torch.zeros(shape, dtype=self.x.dtype, device=self.x.device)
        return (w.T if self.columns else w).to(self.x.dtype).contiguous().clone()

    def weight(self, param: torch.Tensor) -> torch.Tensor:
        """W (D, K) from the parameter in this layout."""
        return (param.T if self.columns else param).contiguous().clone()

    def loss_and_grad(self, w: torch.Tensor, b: torch.Tensor,
                      l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objective, its gradient in the weight parameter and in b (K,)."""
        c = 0 if self.columns else 1                                                   # the class dimension
        z = torch.addmm(b[:, None], w, self.xt) if self.columns else torch.addmm(b, self.x, w)
        if self.softmax and self.offset is not None:
            z = z + (self.offset[:, None] if self.columns else self.offset)
        if self.softmax:
            lse = torch.logsumexp(z, dim=c, keepdim=True)
            loss = (lse - z.gather(c, self.y)).mean()
            g = torch.exp(z - lse)
            g.scatter_add_(c, self.y, self.minus_ones)
            g /= z.shape[1 - c]
        else:
            loss = ((torch.nn.functional.softplus(z) - self.t * z) * self.known_scaled).sum()
            g = (torch.sigmoid(z) - self.t) * self.known_scaled
        loss = loss + 0.5 * l2 * (w * w).sum()
        grad_w = g @ self.x if self.columns else self.xt @ g
        return loss, grad_w + l2 * w, g.sum(dim=1 - c)


def _lbfgs(problem: _Problem, l2: float, init: tuple | None, max_iter: int,
           tol: float) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    x = problem.x
    w = problem.init(None if init is None else init[0])
    b = torch.zeros(problem.k, dtype=x.dtype, device=x.device) if init is None else init[1].to(x.dtype).clone()
    b = torch.nan_to_num(b, neginf=0.0)  # a warm start's -inf (absent class) is re-applied by the offset
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25) + 1,
                            tolerance_grad=tol, tolerance_change=1e-14 if x.dtype == torch.float64 else 1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = problem.loss_and_grad(w, b, l2)
        return loss

    opt.step(closure)
    closure()
    grad_max = float(torch.max(w.grad.abs().max(), b.grad.abs().max()))
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    return problem.weight(w), b.clone(), n_iter, grad_max


def _prepare(features: Any, labels: Any, task: str, num_outputs: int | None, dtype: torch.dtype,
             name: str = "features") -> tuple[_Problem, torch.Tensor, torch.Tensor, int]:
    x = _features(features, name, dtype)
    y, k_out = _targets(task, labels, x.shape[0], num_outputs, x.device, dtype)
    mean, std = standardizer(x)
    k = 1 if task == "multiclass" and k_out == 2 else k_out
    return _Problem(task, (x - mean) / std, y, k), mean, std, k_out


def _fit(problem: _Problem, mean: torch.Tensor, std: torch.Tensor, k_out: int, l2: float, init: tuple | None,
         max_iter: int, tol: float) -> LinearProbe:
    if not l2 > 0:
        raise EvaluationError(f"l2 must be > 0, got {l2}")
    if int(max_iter) < 1 or not tol > 0:
        raise EvaluationError(f"max_iter must be >= 1 and tol > 0, got {max_iter} and {tol}")
    w, b, n_iter, grad_max = _lbfgs(problem, float(l2), init, int(max_iter), float(tol))
    if problem.softmax and problem.offset is not None:
        b = b + problem.offset
    return LinearProbe(problem.task, k_out, w, b, mean, std, float(l2), n_iter, grad_max)


def fit_logistic(features: Any, labels: Any, *, task: str, l2: float, num_outputs: int | None = None,
                 max_iter: int = 1000, tol: float = 1e-7, dtype: torch.dtype = torch.float64) -> LinearProbe:
    """Fit a probe with L2 strength l2 on features (N, D) and labels (N,) int64 or (N, L) float with NaN.

    Runs on the features' device in dtype. num_outputs: C (default max label + 1) or L (from the labels).
    L-BFGS (strong Wolfe line search, history 20) stops when max |gradient| <= tol or after max_iter
    iterations; the probe records n_iter and the final grad_max.
    """
    check_task(task)
    problem, mean, std, k_out = _prepare(features, labels, task, num_outputs, dtype)
    return _fit(problem, mean, std, k_out, l2, None, max_iter, tol)


@dataclass
class ProbeSweep:
    """The probe chosen on validation, its validation metric, and the sweep: one row per L2, largest first."""

    probe: LinearProbe
    metric: str
    value: float
    table: list[dict[str, float]] = field(default_factory=list)

    @property
    def l2(self) -> float:
        return self.probe.l2


def fit_probe_sweep(train_features: Any, train_labels: Any, val_features: Any, val_labels: Any, *, task: str,
                    l2_grid: Sequence[float] = DEFAULT_L2_GRID, select_metric: str | None = None,
                    num_outputs: int | None = None, names: Sequence[str] | None = None, max_iter: int = 1000,
                    tol: float = 1e-7, dtype: torch.dtype = torch.float64,
                    sweep_dtype: torch.dtype = torch.float32, sweep_tol: float = 1e-5) -> ProbeSweep:
    """Fit one probe per L2 strength on train (N, D), score it on validation (M, D), keep the best.

    The sweep runs in sweep_dtype to sweep_tol (float32, 1e-5: enough to rank strengths, several times
    faster on CPU), strengths from the largest down, each warm-started from the previous solution. The
    selection metric (default: accuracy for multiclass, auc_mean for multilabel; any key of
    metrics.metric_arrays) is computed on the validation set only; ties keep the larger L2. The chosen
    strength is then refit in dtype to tol from the sweep's solution (skipped when the dtypes are equal),
    so the returned probe is fit_logistic's model at that strength, on train only (no refit on
    train + validation); value is its validation metric.
    """
    check_task(task)
    metric = select_metric or DEFAULT_SELECT[task]
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not grid or grid[-1] <= 0:
        raise EvaluationError("l2_grid must be a non-empty list of positive strengths")
    if task == "multiclass" and num_outputs is None:
        num_outputs = int(max(task_labels(task, train_labels).max(), task_labels(task, val_labels).max())) + 1
    problem, mean, std, k_out = _prepare(train_features, train_labels, task, num_outputs, dtype, "train_features")
    xv = _features(val_features, "val_features", dtype, mean.device)
    if xv.shape[1] != mean.shape[0]:
        raise EvaluationError(f"val_features have {xv.shape[1]} dimensions, train_features have {mean.shape[0]}")
    yv = task_labels(task, val_labels, "val_labels")
    if yv.shape[0] != xv.shape[0]:
        raise EvaluationError(f"val_labels have {yv.shape[0]} rows, val_features have {xv.shape[0]}")

    def score(probe: LinearProbe) -> float:
        values = metric_arrays(task, yv, to_numpy(probe.predict_proba(xv.to(probe.weight.dtype))), names=names)
        if metric not in values:
            raise EvaluationError(f"select_metric {metric!r} is not a {task} metric; one of {', '.join(values)}")
        return float(values[metric][0])

    refit = sweep_dtype != dtype
    if refit:
        sweep_problem = problem.to(sweep_dtype)
        sweep_mean, sweep_std, tol_sweep = mean.to(sweep_dtype), std.to(sweep_dtype), sweep_tol
    else:
        sweep_problem, sweep_mean, sweep_std, tol_sweep = problem, mean, std, tol
    best, best_value, table, init = None, -np.inf, [], None
    for l2 in grid:
        probe = _fit(sweep_problem, sweep_mean, sweep_std, k_out, l2, init, max_iter, tol_sweep)
        init = (probe.weight, probe.bias)
        value = score(probe)
        table.append({"l2": l2, "C": 1.0 / (l2 * problem.x.shape[0]), metric: value, "n_iter": probe.n_iter,
                      "grad_max": probe.grad_max})
        if best is None or (not np.isnan(value) and value > best_value):
            best, best_value = probe, value
    if refit:
        best = _fit(problem, mean, std, k_out, best.l2, (best.weight, best.bias), max_iter, tol)
        best_value = score(best)
    return ProbeSweep(best, metric, best_value, table)
