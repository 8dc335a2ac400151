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
import torch.nn.functional as F

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


_BASIS_MAX_DIM = 2048  # above this the covariance's eigendecomposition costs more than it saves
_HISTORY = 10          # L-BFGS pairs, carried from one strength to the next and into the refit
_FORCING = 0.01        # Newton-CG: each CG solve to max |residual| <= max(tol / 4, _FORCING * max |gradient|)
_USE_DNN = True        # float32 products on CPU through oneDNN (see _dnn_operands)


def _dnn_operands(x: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x and x^T as oneDNN (mkldnn) tensors for the float32 CPU products, or None where unavailable.

    Both products have one small dimension (K); on the shared AMD EPYC dev machine MKL's sgemm takes
    2-2.5x as long on them as oneDNN's inner product (torch.nn.functional.linear on mkldnn tensors).
    Checked once here against the plain product, to float32 rounding of the sum of |terms|."""
    if not (_USE_DNN and x.dtype == torch.float32 and x.device.type == "cpu" and torch.backends.mkldnn.is_available()):
        return None
    try:
        xm, xtm = x.to_mkldnn(), xt.to_mkldnn()
        w = torch.linspace(-1.0, 1.0, 2 * x.shape[1], dtype=x.dtype).view(2, -1)
        g = torch.linspace(-1.0, 1.0, 2 * x.shape[0], dtype=x.dtype).view(2, -1)
        ok = all(float((F.linear(a.to_mkldnn(), bm).to_dense() - a @ bt).abs().max())
                 <= 64 * torch.finfo(x.dtype).eps * float((a.abs() @ bt.abs()).max())
                 for a, bm, bt in ((w, xm, xt), (g, xtm, x)))
    except (RuntimeError, NotImplementedError):
        return None
    return (xm, xtm) if ok else None


def _columns(x: torch.Tensor) -> bool:
    """The columns layout (see _Problem) for float32 on CPU; rows otherwise (float64, GPUs)."""
    return x.dtype == torch.float32 and x.device.type == "cpu"


def _basis(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """V (D, D), the eigenvectors of the covariance of standardized x (N, D), and x V, both float32.

    Only for the preconditioner (see _Problem). For D > _BASIS_MAX_DIM: (None, x) (the identity)."""
    xf = x.float()
    if x.shape[1] > _BASIS_MAX_DIM:
        return None, xf
    _, v = torch.linalg.eigh(xf.T @ xf / x.shape[0])
    return v, xf @ v


@dataclass
class _Memory:
    """What one fit leaves for the next: its preconditioner d and its L-BFGS pairs in the preconditioned
    parameters u (W = V (d * u)), in canonical order (weights as (K, D) row-major, then the bias), and the
    strength they were taken at."""

    l2: float
    d: torch.Tensor
    s: list[torch.Tensor]
    y: list[torch.Tensor]


class _Problem:
    """The standardized training problem, kept as x (N, D) and x^T (D, N) so both products are plain GEMMs.

    Gradients are written by hand (no autograd graph per evaluation). Two layouts, both exact:
      rows     z = x W + b (N, K), dW = x^T G (D, K): the faster one for float64 (and on GPUs);
      columns  z^T = W^T x^T + b (K, N), dW^T = G^T x (K, D): float32 on CPU, where the products go
               through oneDNN when it is there (_dnn_operands).

    Preconditioning. L-BFGS and CG run on u, theta = (u, u_b) with W = V (d * u), b = d_b * u_b: V the
    eigenvectors of the training features' covariance, d = (h + l2)^-1/2 and d_b = h_b^-1/2 from the
    diagonal of the data Hessian in that basis at the starting point, class by class
    (h_jk = sum_i p_ik (1 - p_ik) (x_i V)_j^2 / N, h_b,k = sum_i p_ik (1 - p_ik) / N). On correlated
    features plain L-BFGS faces a badly conditioned Hessian; in u it needs several times fewer steps.
    The change of variables is exact: loss, penalty ||W||^2 and the stopping test are computed on W
    itself (V need not even be orthogonal), so the solution does not depend on it, only the number of
    iterations does. It costs two (K, D) x (D, D) products per evaluation, small next to the two with x.
    """

    def __init__(self, task: str, x: torch.Tensor, y: torch.Tensor, k: int,
                 basis: tuple[torch.Tensor | None, torch.Tensor] | None = None):
        self.basis = basis if basis is not None else _basis(x)
        v = self.basis[0]
        self.task, self.x, self.xt, self.k, self.labels = task, x, x.T.contiguous(), k, y
        self.v = None if v is None else v.to(device=x.device, dtype=x.dtype)
        self.columns = _columns(x)
        self.dnn = _dnn_operands(x, self.xt) if self.columns else None
        self.shape = (k, x.shape[1]) if self.columns else (x.shape[1], k)
        self.size = k * x.shape[1]
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
        """The same problem in another dtype (layout chosen again, the same basis)."""
        y = self.labels if self.labels.dtype == torch.int64 else self.labels.to(dtype)
        return _Problem(self.task, self.x.to(dtype), y, self.k, self.basis)

    def from_original(self, w: torch.Tensor) -> torch.Tensor:
        """W (D, K) (or its gradient) -> this problem's layout: W^T (K, D) in columns."""
        w = w.to(device=self.x.device, dtype=self.x.dtype)
        return (w.T if self.columns else w).contiguous()

    def to_original(self, w: torch.Tensor) -> torch.Tensor:
        """A weight in this problem's layout -> W (D, K)."""
        return (w.T if self.columns else w).contiguous()

    def init(self, w: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias to start from: W (D, K) and b (K,), or zeros."""
        x = self.x
        if w is None:
            return (torch.zeros(self.shape, dtype=x.dtype, device=x.device),
                    torch.zeros(self.k, dtype=x.dtype, device=x.device))
        b = torch.nan_to_num(b.to(device=x.device, dtype=x.dtype), neginf=0.0)  # -inf: re-applied as offset
        return self.from_original(w), b

    def canonical(self, t: torch.Tensor) -> torch.Tensor:
        """A flat theta-vector in this layout's order -> canonical order (weights (K, D), then the bias)."""
        if self.columns:
            return t
        return torch.cat([t[:self.size].view(self.shape).T.reshape(-1), t[self.size:]])

    def from_canonical(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=self.x.device, dtype=self.x.dtype)
        if self.columns:
            return t
        return torch.cat([t[:self.size].view(self.k, -1).T.reshape(-1), t[self.size:]])

    # --- the objective

    def xw(self, w: torch.Tensor) -> torch.Tensor:
        """Logits without the bias: W^T x^T (K, N) in columns, x W (N, K) in rows."""
        if self.dnn is not None:
            return F.linear(w.contiguous().to_mkldnn(), self.dnn[0]).to_dense()
        return w @ self.xt if self.columns else self.x @ w

    def xtg(self, g: torch.Tensor) -> torch.Tensor:
        """The data gradient from G: G^T x (K, D) in columns, x^T G (D, K) in rows."""
        if self.dnn is not None:
            return F.linear(g.contiguous().to_mkldnn(), self.dnn[1]).to_dense()
        return g @ self.x if self.columns else self.xt @ g

    def logits(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = self.xw(w) + (b[:, None] if self.columns else b)
        if self.softmax and self.offset is not None:
            z = z + (self.offset[:, None] if self.columns else self.offset)
        return z

    def loss_and_grad(self, w: torch.Tensor, b: torch.Tensor,
                      l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objective, its gradient in the weight and in b (K,)."""
        c = 0 if self.columns else 1                                                   # the class dimension
        z = self.logits(w, b)
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
        return loss, self.xtg(g) + l2 * w, g.sum(dim=1 - c)

    def _curvature(self, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per row and output, the loss's second derivative in its logit (the layout's shape)."""
        z = self.logits(w, b)
        if self.softmax:
            p = torch.softmax(z, dim=0 if self.columns else 1)
            return p * (1 - p) / z.shape[1 if self.columns else 0]
        p = torch.sigmoid(z)
        return p * (1 - p) * self.known_scaled

    def preconditioner(self, w: torch.Tensor, b: torch.Tensor, l2: float) -> torch.Tensor:
        """d (flat, canonical order) from the diagonal of the Hessian at (w, b) in the basis V."""
        h = self._curvature(w, b)
        xv = self.basis[1].to(self.x.device)
        hk = (h if self.columns else h.T).to(xv.dtype)                            # (K, N)
        hw = (hk @ (xv * xv)).to(self.x.dtype)                                    # (K, D)
        return torch.cat([(hw + l2).rsqrt().reshape(-1), hk.sum(dim=1).to(self.x.dtype).clamp(min=1e-6).rsqrt()])

    def hessian(self, w: torch.Tensor, b: torch.Tensor, l2: float):
        """hv(vw, vb) -> ((H v)_w, (H v)_b): the objective's Hessian at (w, b), this problem's coordinates."""
        c = 0 if self.columns else 1
        if self.softmax:
            p = torch.softmax(self.logits(w, b), dim=c)
            n = p.shape[1 - c]

            def hz(dz: torch.Tensor) -> torch.Tensor:
                pdz = p * dz
                return (pdz - p * pdz.sum(dim=c, keepdim=True)) / n
        else:
            h = self._curvature(w, b)

            def hz(dz: torch.Tensor) -> torch.Tensor:
                return h * dz

        def hv(vw: torch.Tensor, vb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = hz(self.xw(vw) + (vb[:, None] if self.columns else vb))
            return self.xtg(g) + l2 * vw, g.sum(dim=1 - c)

        return hv

    def objective(self, l2: float, d: torch.Tensor):
        """(to_theta, from_theta, fg) for L-BFGS on theta with the preconditioner d (this layout's order).

        fg(theta) -> (loss, gradient in theta, max |gradient in (W, b)|), all tensors."""
        m, shape, v = self.size, self.shape, self.v
        dw, db = d[:m].view(shape), d[m:]

        def to_theta(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if v is not None:
                w = w @ v if self.columns else v.T @ w
            return torch.cat([(w / dw).reshape(-1), b / db])

        def from_theta(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = theta[:m].view(shape) * dw
            if v is not None:
                u = u @ v.T if self.columns else v @ u
            return u, theta[m:] * db

        def fg(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            w, b = from_theta(theta)
            loss, gw, gb = self.loss_and_grad(w, b, l2)
            grad_max = torch.maximum(gw.abs().max(), gb.abs().max())
            if v is not None:
                gw = gw @ v if self.columns else v.T @ gw
            return loss, torch.cat([(gw * dw).reshape(-1), gb * db]), grad_max

        return to_theta, from_theta, fg


def _minimize(fg, theta: torch.Tensor, max_iter: int, tol: float, s_hist: list[torch.Tensor],
              y_hist: list[torch.Tensor], history: int = _HISTORY,
              max_ls: int = 25) -> tuple[torch.Tensor, int, float]:
    """L-BFGS (two-loop recursion, initial scaling s'y / y'y) with a backtracking Armijo line search.

    s_hist / y_hist: the memory to start from (updated in place). The objective is strictly convex
    (l2 > 0), so accepted steps give s'y > 0. Stops when max |gradient| <= tol, after max_iter
    iterations, or when the line search finds no decrease (the loss's rounding floor). The Armijo test
    allows a margin of a few ulps of the loss, so a float32 sweep is not stopped by its loss's resolution
    while the gradient is still above tol. Returns theta, the iterations and the final max |gradient|.
    Host syncs: one per evaluation (loss and max |gradient| together) and two per iteration.
    """
    eps = torch.finfo(theta.dtype).eps
    loss, g, gmax = fg(theta)
    f, gmax = torch.stack([loss, gmax]).tolist()
    n_iter = 0
    while gmax > tol and n_iter < max_iter:
        n_iter += 1
        q = -g
        rhos = [1.0 / torch.dot(s, y) for s, y in zip(s_hist, y_hist)]
        alphas = []
        for s, y, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rhos)):
            a = rho * torch.dot(s, q)
            q = q - a * y
            alphas.append(a)
        if s_hist:
            q = q * (torch.dot(s_hist[-1], y_hist[-1]) / torch.dot(y_hist[-1], y_hist[-1]))
        for s, y, rho, a in zip(s_hist, y_hist, rhos, reversed(alphas)):
            q = q + (a - rho * torch.dot(y, q)) * s
        gtd = float(torch.dot(g, q))
        if not gtd < 0:  # not a descent direction (rounding): forget the memory, steepest descent
            s_hist.clear(), y_hist.clear()
            q = -g
            gtd = float(torch.dot(g, q))
        t, accepted = 1.0, False
        for _ in range(max_ls):
            new = theta + t * q
            loss_new, g_new, gmax_new = fg(new)
            f_new, gmax_new = torch.stack([loss_new, gmax_new]).tolist()
            if f_new <= f + 1e-4 * t * gtd + 8 * eps * abs(f):
                accepted = True
                break
            # the minimum of the quadratic through f, gtd and f_new, kept in [0.1 t, 0.5 t]
            curv = 2.0 * (f_new - f - gtd * t)
            t = min(max(-gtd * t * t / curv if curv > 0 else 0.5 * t, 0.1 * t), 0.5 * t)
        if not accepted:
            break
        s, y = new - theta, g_new - g
        if float(torch.dot(s, y)) > eps * float(torch.dot(y, y)):
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > history:
                del s_hist[0], y_hist[0]
        theta, g, f, gmax = new, g_new, f_new, gmax_new
    return theta, n_iter, gmax


def _lbfgs(problem: _Problem, l2: float, init: tuple | None, max_iter: int, tol: float,
           memory: _Memory | None = None,
           reuse_d: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, float, _Memory]:
    """One fit from init (W (D, K), b) or zeros. memory: a previous fit's pairs, carried over exactly to
    this preconditioner and strength (reuse_d: keep its preconditioner too, for a refit at its point).
    Returns W (D, K), b, iterations, max |gradient| and this fit's memory."""
    w, b = problem.init(*(init if init is not None else (None, None)))
    d = problem.from_canonical(memory.d) if reuse_d and memory is not None else problem.preconditioner(w, b, l2)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    if memory is not None:
        # u' = u * d_old / d: pairs s' = s * r, y' = y / r; the penalty's Hessian in u' is l2 d^2 on the
        # weights (V orthogonal), so a change of strength adds (l2 - l2_old) d^2 s' to y'.
        r = problem.from_canonical(memory.d) / d
        pen = torch.cat([d[:problem.size] ** 2, torch.zeros_like(d[problem.size:])]) * (l2 - memory.l2)
        for s, y in zip(memory.s, memory.y):
            s = problem.from_canonical(s) * r
            s_hist.append(s)
            y_hist.append(problem.from_canonical(y) / r + pen * s)
    to_theta, from_theta, fg = problem.objective(l2, d)
    theta, n_iter, gmax = _minimize(fg, to_theta(w, b), max_iter, tol, s_hist, y_hist)
    w, b = from_theta(theta)
    memory = _Memory(l2, problem.canonical(d), [problem.canonical(s) for s in s_hist],
                     [problem.canonical(y) for y in y_hist])
    return problem.to_original(w), b.clone(), n_iter, gmax, memory


def _newton_refit(problem: _Problem, approx: _Problem, l2: float, w: torch.Tensor, b: torch.Tensor,
                  memory: _Memory, tol: float, max_steps: int = 6,
                  max_cg: int = 500) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Newton steps on problem (float64) from its weight w and bias b, each Newton system solved by
    preconditioned CG on approx (the same problem in float32, cheaper), preconditioned by the sweep's
    L-BFGS memory at this strength (its inverse-Hessian estimate, on top of the diagonal d).

    Iterative refinement: gradient, step and line search are float64, the float32 Hessian only has to
    be good to the CG tolerance (residual max |r| <= tol / 4). Returns (w, b, Newton steps,
    max |gradient|), the last > tol if it did not get there (the caller goes on with L-BFGS)."""
    m = approx.size
    dflat = approx.from_canonical(memory.d)
    dw, db = dflat[:m].view(approx.shape), dflat[m:]
    v = approx.v
    pairs = [(approx.from_canonical(s), approx.from_canonical(y)) for s, y in zip(memory.s, memory.y)]
    rhos = [1.0 / torch.dot(s, y) for s, y in pairs]
    gamma = torch.dot(*pairs[-1]) / torch.dot(pairs[-1][1], pairs[-1][1]) if pairs else 1.0

    def precond(rw: torch.Tensor, rb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:   # P H_u P^T
        if v is not None:
            rw = rw @ v if approx.columns else v.T @ rw
        q = torch.cat([(rw * dw).reshape(-1), rb * db])
        alphas = []
        for (s, y), rho in zip(reversed(pairs), reversed(rhos)):
            a = rho * torch.dot(s, q)
            q = q - a * y
            alphas.append(a)
        q = q * gamma
        for (s, y), rho, a in zip(pairs, rhos, reversed(alphas)):
            q = q + (a - rho * torch.dot(y, q)) * s
        zw, zb = q[:m].view(approx.shape) * dw, q[m:] * db
        if v is not None:
            zw = zw @ v.T if approx.columns else v @ zw
        return zw, zb

    def dot(aw, ab, cw, cb) -> torch.Tensor:
        return torch.dot(aw.reshape(-1), cw.reshape(-1)) + torch.dot(ab, cb)

    def gmax_of(gw, gb) -> torch.Tensor:
        return torch.maximum(gw.abs().max(), gb.abs().max())

    eps = torch.finfo(problem.x.dtype).eps
    loss, gw, gb = problem.loss_and_grad(w, b, l2)
    f, gmax = torch.stack([loss, gmax_of(gw, gb)]).tolist()
    steps = 0
    while gmax > tol and steps < max_steps:
        steps += 1
        hv = approx.hessian(approx.from_original(problem.to_original(w)), b.to(approx.x.dtype), l2)
        rw, rb = -approx.from_original(problem.to_original(gw)), -gb.to(approx.x.dtype)
        xw, xb = torch.zeros_like(rw), torch.zeros_like(rb)
        target = max(0.25 * tol, _FORCING * gmax)
        zw, zb = precond(rw, rb)
        pw, pb, rz = zw, zb, dot(rw, rb, zw, zb)
        for _ in range(max_cg):
            aw, ab = hv(pw, pb)
            alpha = rz / dot(pw, pb, aw, ab)
            xw, xb, rw, rb = xw + alpha * pw, xb + alpha * pb, rw - alpha * aw, rb - alpha * ab
            if float(gmax_of(rw, rb)) <= target:
                break
            zw, zb = precond(rw, rb)
            rz_new = dot(rw, rb, zw, zb)
            pw, pb, rz = zw + (rz_new / rz) * pw, zb + (rz_new / rz) * pb, rz_new
        sw = problem.from_original(approx.to_original(xw))
        sb = xb.to(problem.x.dtype)
        gts = float(dot(gw, gb, sw, sb))
        if not gts < 0:
            break
        t = 1.0
        for _ in range(10):
            loss_new, gw_new, gb_new = problem.loss_and_grad(w + t * sw, b + t * sb, l2)
            f_new, gmax_new = torch.stack([loss_new, gmax_of(gw_new, gb_new)]).tolist()
            if f_new <= f + 1e-4 * t * gts + 8 * eps * abs(f):
                break
            t *= 0.5
        else:
            break
        w, b, gw, gb, f, gmax = w + t * sw, b + t * sb, gw_new, gb_new, f_new, gmax_new
    return w, b, steps, gmax


def _prepare(features: Any, labels: Any, task: str, num_outputs: int | None, dtype: torch.dtype,
             name: str = "features") -> tuple[_Problem, torch.Tensor, torch.Tensor, int]:
    x = _features(features, name, dtype)
    y, k_out = _targets(task, labels, x.shape[0], num_outputs, x.device, dtype)
    mean, std = standardizer(x)
    k = 1 if task == "multiclass" and k_out == 2 else k_out
    return _Problem(task, (x - mean) / std, y, k), mean, std, k_out


def _probe(problem: _Problem, mean: torch.Tensor, std: torch.Tensor, k_out: int, l2: float, w: torch.Tensor,
           b: torch.Tensor, n_iter: int, grad_max: float) -> LinearProbe:
    if problem.softmax and problem.offset is not None:
        b = b + problem.offset
    return LinearProbe(problem.task, k_out, w, b, mean, std, float(l2), n_iter, grad_max)


def _fit(problem: _Problem, mean: torch.Tensor, std: torch.Tensor, k_out: int, l2: float, init: tuple | None,
         max_iter: int, tol: float, memory: _Memory | None = None,
         reuse_d: bool = False) -> tuple[LinearProbe, _Memory]:
    if not l2 > 0:
        raise EvaluationError(f"l2 must be > 0, got {l2}")
    if int(max_iter) < 1 or not tol > 0:
        raise EvaluationError(f"max_iter must be >= 1 and tol > 0, got {max_iter} and {tol}")
    w, b, n_iter, grad_max, memory = _lbfgs(problem, float(l2), init, int(max_iter), float(tol), memory, reuse_d)
    return _probe(problem, mean, std, k_out, l2, w, b, n_iter, grad_max), memory


def _refit(problem: _Problem, approx: _Problem, mean: torch.Tensor, std: torch.Tensor, k_out: int,
           start: LinearProbe, memory: _Memory, max_iter: int, tol: float) -> LinearProbe:
    """start (a sweep's probe, fit on approx) refit on problem to tol: Newton steps with float32 CG, then,
    should they not get there, L-BFGS with the sweep's memory. n_iter counts the steps of both kinds."""
    w, b = problem.init(start.weight, start.bias)
    w, b, steps, grad_max = _newton_refit(problem, approx, start.l2, w, b, memory, tol)
    if grad_max > tol:
        probe, _ = _fit(problem, mean, std, k_out, start.l2, (problem.to_original(w), b),
                        max(1, max_iter - steps), tol, memory, reuse_d=True)
        probe.n_iter += steps
        return probe
    return _probe(problem, mean, std, k_out, start.l2, problem.to_original(w), b.clone(), steps, grad_max)


def fit_logistic(features: Any, labels: Any, *, task: str, l2: float, num_outputs: int | None = None,
                 max_iter: int = 1000, tol: float = 1e-7, dtype: torch.dtype = torch.float64) -> LinearProbe:
    """Fit a probe with L2 strength l2 on features (N, D) and labels (N,) int64 or (N, L) float with NaN.

    Runs on the features' device in dtype. num_outputs: C (default max label + 1) or L (from the labels).
    L-BFGS (history 10, backtracking Armijo line search) on preconditioned parameters (see _Problem)
    stops when max |gradient| <= tol or after max_iter iterations; the probe records n_iter and the final
    grad_max.
    """
    check_task(task)
    problem, mean, std, k_out = _prepare(features, labels, task, num_outputs, dtype)
    return _fit(problem, mean, std, k_out, l2, None, max_iter, tol)[0]


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
                    sweep_dtype: torch.dtype = torch.float32, sweep_tol: float = 1e-4) -> ProbeSweep:
    """Fit one probe per L2 strength on train (N, D), score it on validation (M, D), keep the best.

    The sweep runs in sweep_dtype to sweep_tol (float32, 1e-4: scikit-learn's default tolerance on the
    same max |gradient|, enough to rank strengths), strengths from the largest down, each warm-started
    from the previous solution and its L-BFGS memory. The selection metric (default: accuracy for
    multiclass, auc_mean for multilabel; any key of metrics.metric_arrays) is computed on the validation
    set only; ties keep the larger L2. The chosen strength is then refit in dtype to tol from the
    sweep's solution (skipped when the dtypes are equal): Newton steps whose systems are solved by CG in
    sweep_dtype (gradients and steps in dtype), L-BFGS in dtype should they not get there. So the
    returned probe is fit_logistic's model at that strength (to tol), on train only (no refit on
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
    best, best_memory, best_value, table, init, memory = None, None, -np.inf, [], None, None
    for l2 in grid:
        probe, memory = _fit(sweep_problem, sweep_mean, sweep_std, k_out, l2, init, max_iter, tol_sweep, memory)
        init = (probe.weight, probe.bias)
        value = score(probe)
        table.append({"l2": l2, "C": 1.0 / (l2 * problem.x.shape[0]), metric: value, "n_iter": probe.n_iter,
                      "grad_max": probe.grad_max})
        if best is None or (not np.isnan(value) and value > best_value):
            best, best_memory, best_value = probe, memory, value
    if refit:
        best = _refit(problem, sweep_problem, mean, std, k_out, best, best_memory, max_iter, tol)
        best_value = score(best)
    return ProbeSweep(best, metric, best_value, table)
