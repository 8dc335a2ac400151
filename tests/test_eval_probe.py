"""The L-BFGS linear probe against scikit-learn's LogisticRegression(lbfgs) with C = 1 / (l2 * N)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.probe import LinearProbe, fit_logistic, fit_probe_sweep

TOL = 1e-4  # required agreement of predicted probabilities


# tiny matrices: intra-op threads only add wake-up latency (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=400, d=24, c=4, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, d) + 5.0  # unstandardized on purpose
    w = rng.normal(size=(d, c))
    y = ((x - 5.0) @ w + shift + rng.gumbel(size=(n, c))).argmax(1)
    return x, y


def _standardized(x, ref):
    return (x - ref.mean(axis=0)) / ref.std(axis=0)


def _sklearn(xs, y, l2):
    return LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(xs, y)


@pytest.mark.parametrize("c,l2", [(4, 1e-2), (4, 1e-4), (2, 1e-3)])
def test_multiclass_probe_equals_sklearn(c, l2):
    x, y = _data(c=c)
    xq, _ = _data(n=100, c=c, seed=1)
    probe = fit_logistic(torch.from_numpy(x), torch.from_numpy(y), task="multiclass", l2=l2)
    sk = _sklearn(_standardized(x, x), y, l2)
    np.testing.assert_allclose(probe.mean.numpy(), x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(probe.std.numpy(), x.std(axis=0), rtol=1e-12)
    for feats in (x, xq):
        ours = probe.predict_proba(torch.from_numpy(feats)).numpy()
        assert ours.shape == (len(feats), c)
        assert np.abs(ours - sk.predict_proba(_standardized(feats, x))).max() < TOL


def test_multilabel_probe_equals_per_label_sklearn_with_nan_masked():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 16))
    y = (x @ rng.normal(size=(16, 3)) + rng.logistic(size=(300, 3)) > 0.5).astype(float)
    y[rng.random(y.shape) < [0.1, 0.3, 0.5]] = np.nan
    l2 = 3e-3
    probe = fit_logistic(x, y, task="multilabel", l2=l2)
    ours = probe.predict_proba(x).numpy()
    xs = _standardized(x, x)  # standardized with all training rows, not per label
    for k in range(3):
        known = ~np.isnan(y[:, k])
        sk = _sklearn(xs[known], y[known, k], l2)  # C_l = 1 / (l2 * n_l)
        assert np.abs(ours[:, k] - sk.predict_proba(xs)[:, 1]).max() < TOL


def test_sweep_selects_on_validation():
    x, y = _data(n=300, d=40, c=3, seed=5)
    xv, yv = _data(n=200, d=40, c=3, seed=6)
    grid = [1e-4, 1e-2, 1.0]
    xs, xvs = _standardized(x, x), _standardized(xv, x)
    expected = {l2: float(np.mean(_sklearn(xs, y, l2).predict(xvs) == yv)) for l2 in grid}
    best = max(expected.values())
    chosen = max(l2 for l2, v in expected.items() if v == best)  # ties keep the larger l2
    # a float64 sweep scores every strength exactly as scikit-learn's model would
    exact = fit_probe_sweep(x, y, xv, yv, task="multiclass", l2_grid=grid, sweep_dtype=torch.float64)
    assert [row["l2"] for row in exact.table] == [1.0, 1e-2, 1e-4]  # strongest first (warm starts)
    for row in exact.table:
        assert row["accuracy"] == pytest.approx(expected[row["l2"]], abs=1e-12)
        assert row["C"] == pytest.approx(1.0 / (row["l2"] * 300))
    assert exact.l2 == chosen and exact.value == pytest.approx(best, abs=1e-12)
    # the default float32 sweep picks the same strength; the float64 refit is scikit-learn's model
    sweep = fit_probe_sweep(x, y, xv, yv, task="multiclass", l2_grid=grid)
    assert sweep.l2 == chosen and sweep.probe.weight.dtype == torch.float64
    sk = _sklearn(xs, y, chosen)
    assert np.abs(sweep.probe.predict_proba(xv).numpy() - sk.predict_proba(xvs)).max() < TOL
    assert sweep.value == pytest.approx(float(np.mean(sk.predict(xvs) == yv)), abs=1e-12)


def test_multilabel_sweep_refit_equals_sklearn():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(240, 10))
    y = (x @ rng.normal(size=(10, 2)) + rng.logistic(size=(240, 2)) > 0).astype(float)
    y[rng.random(y.shape) < 0.2] = np.nan
    sweep = fit_probe_sweep(x[:160], y[:160], x[160:], y[160:], task="multilabel", l2_grid=[1e-3, 1e-1])
    assert sweep.metric == "auc_mean"
    xs = _standardized(x, x[:160])
    for k in range(2):
        known = ~np.isnan(y[:160, k])
        sk = _sklearn(xs[:160][known], y[:160][known, k], sweep.l2)
        assert np.abs(sweep.probe.predict_proba(x).numpy()[:, k] - sk.predict_proba(xs)[:, 1]).max() < TOL


def test_sweep_by_another_metric_and_state_round_trip():
    x, y = _data(n=200, d=12, c=3, seed=7)
    sweep = fit_probe_sweep(x, y, x[:80], y[:80], task="multiclass", l2_grid=[1e-3, 1e-1],
                            select_metric="balanced_accuracy")
    assert sweep.metric == "balanced_accuracy" and "balanced_accuracy" in sweep.table[0]
    again = LinearProbe.from_state_dict(sweep.probe.state_dict())
    assert torch.equal(again.predict_proba(x), sweep.probe.predict_proba(x))


@pytest.mark.parametrize("call,match", [
    (lambda x, y: fit_logistic(x, y, task="multiclass", l2=0.0), "l2 must be > 0"),
    (lambda x, y: fit_logistic(x[:, 0], y, task="multiclass", l2=1e-3), "shape"),
    (lambda x, y: fit_logistic(x, y[:-1], task="multiclass", l2=1e-3), "rows"),
    (lambda x, y: fit_logistic(x, y, task="multiclass", l2=1e-3, num_outputs=2), "out of range"),
    (lambda x, y: fit_logistic(x, y, task="segmentation", l2=1e-3), "task must be"),
    (lambda x, y: fit_probe_sweep(x, y, x[:, :3], y, task="multiclass"), "dimensions"),
    (lambda x, y: fit_probe_sweep(x, y, x, y, task="multiclass", select_metric="f1"), "not a multiclass metric"),
    (lambda x, y: fit_logistic(x, y, task="multiclass", l2=1e-3).predict_proba(x[:, :3]), "dimensions"),
])
def test_bad_input_is_one_line(call, match):
    x, y = _data(n=60, d=6, c=3)
    with pytest.raises(EvaluationError, match=match) as err:
        call(x, y)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_probe_on_cuda_equals_sklearn():
    x, y = _data(c=4)
    probe = fit_logistic(torch.from_numpy(x).cuda(), torch.from_numpy(y), task="multiclass", l2=1e-3)
    sk = _sklearn(_standardized(x, x), y, 1e-3)
    assert np.abs(probe.predict_proba(torch.from_numpy(x).cuda()).cpu().numpy()
                  - sk.predict_proba(_standardized(x, x))).max() < TOL


def test_class_absent_from_train_gets_probability_zero():
    x, y = _data(n=300, c=4, seed=9)
    keep = y != 1
    probe = fit_logistic(x[keep], y[keep], task="multiclass", l2=1e-2, num_outputs=4)
    ours = probe.predict_proba(x).numpy()
    assert (ours[:, 1] == 0).all()
    # the other classes are the three-class model scikit-learn fits on the same rows
    remap = np.array([0, -1, 1, 2])
    sk = _sklearn(_standardized(x[keep], x[keep]), remap[y[keep]], 1e-2)
    assert np.abs(ours[:, [0, 2, 3]] - sk.predict_proba(_standardized(x, x[keep]))).max() < TOL
    with pytest.raises(EvaluationError, match="single class"):
        fit_logistic(x, np.zeros(len(x), dtype=np.int64), task="multiclass", l2=1e-2, num_outputs=3)


@pytest.mark.parametrize("variant", ["default", "no_basis", "no_onednn", "rows_layout", "lbfgs_refit", "absent_class"])
def test_sweep_refit_equals_sklearn_on_every_path(monkeypatch, variant):
    """The preconditioner (eigenbasis or identity), the float32 products (oneDNN, plain, or the rows layout
    GPUs use) and the refit (Newton-CG, or L-BFGS when Newton stops short) change the iterations, never
    the returned model."""
    import medssl_scale.evaluate.probe as probe_mod

    x, y = _data(n=400, d=30, c=4, seed=11)
    x = x @ np.random.default_rng(12).normal(size=(30, 30))  # correlated features
    xv, yv = _data(n=150, d=30, c=4, seed=13)
    xv = xv @ np.random.default_rng(12).normal(size=(30, 30))
    if variant == "no_basis":
        monkeypatch.setattr(probe_mod, "_BASIS_MAX_DIM", 0)
    if variant == "no_onednn":
        monkeypatch.setattr(probe_mod, "_USE_DNN", False)
    if variant == "rows_layout":
        monkeypatch.setattr(probe_mod, "_columns", lambda x: False)
    if variant == "lbfgs_refit":
        newton = probe_mod._newton_refit
        monkeypatch.setattr(probe_mod, "_newton_refit", lambda *a, **k: newton(*a, **k, max_steps=0))
    keep = y != 1 if variant == "absent_class" else np.ones(len(y), dtype=bool)
    sweep = fit_probe_sweep(x[keep], y[keep], xv, yv, task="multiclass", num_outputs=4, l2_grid=[1e-3, 1e-2, 1e-1])
    assert sweep.probe.grad_max <= 1e-7 and sweep.probe.weight.dtype == torch.float64
    ours = sweep.probe.predict_proba(xv).numpy()
    labels = np.array([0, -1, 1, 2])[y[keep]] if variant == "absent_class" else y
    sk = _sklearn(_standardized(x[keep], x[keep]), labels, sweep.l2)
    cols = [0, 2, 3] if variant == "absent_class" else [0, 1, 2, 3]
    assert np.abs(ours[:, cols] - sk.predict_proba(_standardized(xv, x[keep]))).max() < TOL
    if variant == "absent_class":
        assert (ours[:, 1] == 0).all()
