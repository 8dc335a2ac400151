"""Evaluation metrics against scikit-learn and hand computations; the patient bootstrap against a loop."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from medssl_scale.evaluate.bootstrap import bootstrap_metrics, patient_resample_counts
from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.metrics import (
    calibration_bins,
    expected_calibration_error,
    multiclass_metrics,
    multilabel_metrics,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _multiclass_case(n=400, c=5, seed=0, round_to=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    z = rng.normal(size=(n, c))
    z[np.arange(n), y] += 1.0
    p = np.round(_softmax(z), round_to)  # rounding creates tied scores, which AUC must count one half
    return y, p / p.sum(axis=1, keepdims=True)


def _multilabel_case(n=300, l=4, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, l)) < [0.3, 0.5, 0.1, 0.6]).astype(float)
    p = np.round(np.clip(0.5 * y + rng.random((n, l)) * 0.7, 0, 1), 2)
    y[rng.random((n, l)) < 0.25] = np.nan
    return y, p


# ---- point metrics against scikit-learn ---------------------------------------------------------------

def test_multiclass_equals_sklearn():
    y, p = _multiclass_case()
    m = multiclass_metrics(y, p, names=list("abcde"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    for k, name in enumerate("abcde"):
        assert m[f"auc/{name}"] == pytest.approx(roc_auc_score(y == k, p[:, k]), abs=1e-12)
    assert m.auc_excluded == ()


def test_multiclass_absent_class_is_left_out():
    y, p = _multiclass_case(c=4, seed=3)
    keep = y != 2
    y, p = y[keep], p[keep]
    m = multiclass_metrics(y, p)
    assert np.isnan(m["auc/2"]) and m.auc_excluded == ("2",)
    present = [0, 1, 3]
    assert m["auc_macro"] == pytest.approx(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred holds a class absent from y_true
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)), abs=1e-12)


def test_multilabel_equals_sklearn_with_nan_masked():
    y, p = _multilabel_case()
    m = multilabel_metrics(y, p, names=["atel", "card", "cons", "edema"])
    per = []
    for k, name in enumerate(["atel", "card", "cons", "edema"]):
        known = ~np.isnan(y[:, k])
        per.append(roc_auc_score(y[known, k], p[known, k]))
        assert m[f"auc/{name}"] == pytest.approx(per[-1], abs=1e-12)
    assert m["auc_mean"] == pytest.approx(np.mean(per), abs=1e-12)


def test_multilabel_single_class_label_is_nan_and_left_out():
    y, p = _multilabel_case()
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # only negatives known
    m = multilabel_metrics(y, p)
    assert np.isnan(m["auc/2"]) and m.auc_excluded == ("2",)
    expect = [roc_auc_score(y[~np.isnan(y[:, k]), k], p[~np.isnan(y[:, k]), k]) for k in (0, 1, 3)]
    assert m["auc_mean"] == pytest.approx(np.mean(expect), abs=1e-12)


# ---- expected calibration error ------------------------------------------------------------------------

def test_ece_hand_computation():
    probs = np.array([[0.90, 0.05, 0.05],   # label 0, conf .90 correct -> bin 13 (13/15, 14/15]
                      [0.10, 0.88, 0.02],   # label 0, conf .88 wrong   -> bin 13
                      [0.50, 0.30, 0.20],   # label 0, conf .50 correct -> bin 7
                      [0.20, 0.45, 0.35],   # label 2, conf .45 wrong   -> bin 6
                      [0.70, 0.20, 0.10],   # label 0, conf .70 correct -> bin 10
                      [0.30, 0.62, 0.08]])  # label 1, conf .62 correct -> bin 9
    labels = np.array([0, 0, 0, 2, 0, 1])
    # bin 13: 2 images, accuracy 1/2, mean confidence .89; every other bin holds one image
    expected = (2 * abs(0.5 - 0.89) + abs(1 - 0.5) + abs(0 - 0.45) + abs(1 - 0.7) + abs(1 - 0.62)) / 6
    assert expected_calibration_error(labels, probs) == pytest.approx(expected, abs=1e-12)
    bins = calibration_bins(labels, probs)
    assert bins.count.tolist() == [0] * 6 + [1, 1, 0, 1, 1, 0, 0, 2, 0]
    assert bins.accuracy[13] == 0.5 and bins.confidence[13] == pytest.approx(0.89)
    assert bins.ece == pytest.approx(expected, abs=1e-12)


def test_ece_bins_are_right_closed():
    probs = np.array([[0.5, 0.5, 0.0], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0]])
    labels = np.array([1, 0, 0])  # first: argmax picks class 0 (first of the tie), wrong
    # 4 bins: 0.5 -> (0.25, 0.5], 0.75 -> (0.5, 0.75], 1.0 -> (0.75, 1]
    assert calibration_bins(labels, probs, n_bins=4).count.tolist() == [0, 1, 1, 1]
    assert expected_calibration_error(labels, probs, n_bins=4) == pytest.approx((0.5 + 0.25 + 0.0) / 3)


# ---- patient bootstrap against a hand-written loop -----------------------------------------------------

def _ece_loop(y, p, n_bins=15):
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [i for i in range(len(y)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if inside:
            acc = np.mean([pred[i] == y[i] for i in inside])
            total += len(inside) / len(y) * abs(acc - np.mean([conf[i] for i in inside]))
    return total


def _pairwise_auc(positive, scores):
    """Mann-Whitney by all positive x negative pairs, ties one half (what roc_auc_score equals, tested above)."""
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return np.nan
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _macro_auc_loop(y, p):
    aucs = [_pairwise_auc(y == k, p[:, k]) for k in range(p.shape[1]) if 0 < np.sum(y == k) < len(y)]
    return np.mean(aucs) if aucs else np.nan


def _balanced_accuracy_loop(y, pred):
    return np.mean([np.mean(pred[y == k] == k) for k in np.unique(y)])


def _patients(n_patients, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_patients)
    return np.repeat([f"pt{i:03d}" for i in range(n_patients)], sizes)


def _loop_reference(pids, draws_of, stat):
    """Resample b = the images of patients draws_of[b], in order; stat on each; percentile interval."""
    patients = np.unique(pids)
    images_of = {q: np.flatnonzero(pids == q) for q in patients}
    values = []
    for row in draws_of:
        idx = np.concatenate([images_of[patients[j]] for j in row])
        values.append(stat(idx))
    values = np.array(values, dtype=float)
    values = values[~np.isnan(values)]
    return np.percentile(values, [2.5, 97.5]), values.size


def test_bootstrap_multiclass_equals_loop_reference():
    pids = _patients(25, seed=4)
    y, p = _multiclass_case(n=len(pids), c=3, seed=5, round_to=1)
    n_res, seed = 200, 7
    got = bootstrap_metrics("multiclass", y, p, pids, n_resamples=n_res, seed=seed)
    draws = np.random.default_rng(seed).integers(0, 25, size=(n_res, 25))
    refs = {
        "accuracy": lambda i: np.mean(y[i] == p[i].argmax(1)),
        "balanced_accuracy": lambda i: _balanced_accuracy_loop(y[i], p[i].argmax(1)),
        "auc_macro": lambda i: _macro_auc_loop(y[i], p[i]),
        "ece": lambda i: _ece_loop(y[i], p[i]),
    }
    for name, stat in refs.items():
        (low, high), n_defined = _loop_reference(pids, draws, stat)
        assert got[name].low == pytest.approx(low, abs=1e-12), name
        assert got[name].high == pytest.approx(high, abs=1e-12), name
        assert got[name].n_defined == n_defined
        assert got[name].value == pytest.approx(stat(np.arange(len(y))), abs=1e-12)


def test_bootstrap_multilabel_equals_loop_reference():
    pids = _patients(30, seed=8)
    y, p = _multilabel_case(n=len(pids), seed=9)
    got = bootstrap_metrics("multilabel", y, p, pids, n_resamples=150, seed=3)
    draws = np.random.default_rng(3).integers(0, 30, size=(150, 30))

    def auc(i, k):
        known = ~np.isnan(y[i, k])
        return _pairwise_auc(y[i, k][known] == 1, p[i, k][known])

    for k in range(4):
        (low, high), _ = _loop_reference(pids, draws, lambda i: auc(i, k))
        assert (got[f"auc/{k}"].low, got[f"auc/{k}"].high) == pytest.approx((low, high), abs=1e-12)
    (low, high), _ = _loop_reference(pids, draws, lambda i: np.nanmean([auc(i, k) for k in range(4)]))
    assert (got["auc_mean"].low, got["auc_mean"].high) == pytest.approx((low, high), abs=1e-12)


def test_bootstrap_resamples_patients_not_images():
    # 4 patients x 5 images; two patients' images are all right, two all wrong
    pids = np.repeat(["a", "b", "c", "d"], 5)
    y = np.zeros(20, dtype=np.int64)
    correct = np.repeat([True, True, False, False], 5)
    p = np.where(correct[:, None], [[0.8, 0.2]], [[0.3, 0.7]])
    got = bootstrap_metrics("multiclass", y, p, pids, n_resamples=1000, seed=0)["accuracy"]
    # by patient, a resample's accuracy is (#right patients drawn) / 4: Binomial(4, 1/2) / 4
    draws = np.random.default_rng(0).integers(0, 4, size=(1000, 4))
    by_patient = (draws < 2).mean(axis=1)
    assert (got.low, got.high) == pytest.approx(tuple(np.percentile(by_patient, [2.5, 97.5])), abs=1e-12)
    assert got.low == 0.0 and got.high == 1.0
    # by image it would be Binomial(20, 1/2) / 20, a much narrower interval
    by_image = correct[np.random.default_rng(0).integers(0, 20, size=(1000, 20))].mean(axis=1)
    low_i, high_i = np.percentile(by_image, [2.5, 97.5])
    assert 0.2 <= low_i and high_i <= 0.8


def test_resample_counts_bring_all_images_of_a_patient():
    pidx = np.array([0, 0, 1, 2, 2, 2])
    draws = np.array([[0, 0, 2], [1, 1, 1]])
    assert patient_resample_counts(pidx, draws).tolist() == [[2, 2, 0, 1, 1, 1], [0, 0, 3, 0, 0, 0]]


def test_bootstrap_is_seeded():
    pids = _patients(20, seed=1)
    y, p = _multiclass_case(n=len(pids), c=3, seed=2)
    a = bootstrap_metrics("multiclass", y, p, pids, n_resamples=100, seed=11)
    b = bootstrap_metrics("multiclass", y, p, pids, n_resamples=100, seed=11)
    c = bootstrap_metrics("multiclass", y, p, pids, n_resamples=100, seed=12)
    assert a == b and a != c


# ---- errors a user can cause: one line ----------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: multiclass_metrics([0, 1, 3], np.full((3, 3), 1 / 3)),
    lambda: multiclass_metrics([0, 1], np.full((3, 3), 1 / 3)),
    lambda: multiclass_metrics([[0, 1]], np.full((1, 2), 0.5)),
    lambda: multilabel_metrics(np.array([[0.0, 2.0]]), np.full((1, 2), 0.5)),
    lambda: multiclass_metrics([0, 1], np.array([[np.nan, 1.0], [0.5, 0.5]])),
    lambda: bootstrap_metrics("multiclass", [0, 1], np.full((2, 2), 0.5), ["a"]),
    lambda: bootstrap_metrics("regression", [0, 1], np.full((2, 2), 0.5), ["a", "b"]),
    lambda: bootstrap_metrics("multiclass", [0, 1], np.full((2, 2), 0.5), ["a", "b"], n_resamples=0),
])
def test_bad_input_is_one_line(call):
    with pytest.raises(EvaluationError) as err:
        call()
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value) and str(err.value)
