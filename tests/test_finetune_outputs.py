"""Run outputs of an evaluation: metrics block against scikit-learn and a direct bootstrap call, the pooled
binary ECE against hand computations, metrics.json / predictions.csv round trips, and the PNGs."""

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from medssl_scale.evaluate.bootstrap import bootstrap_metrics
from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.metrics import expected_calibration_error
from medssl_scale.finetune import outputs

CLASSES = ["normal", "pneumonia", "covid", "effusion", "mass"]
LABELS = ["cardiomegaly", "edema", "atelectasis"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _multiclass(n=150, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    p = rng.dirichlet(np.ones(len(CLASSES)), n)
    p[np.arange(n), y] += rng.uniform(0, 0.8, n)  # informative but imperfect
    p /= p.sum(axis=1, keepdims=True)
    return y, p, np.array([f"p{i // 3:03d}" for i in range(n)])


def _multilabel(n=120, seed=1):
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=(n, len(LABELS))) < 0.4).astype(np.float64)
    p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.2, y.shape))))
    y[rng.uniform(size=y.shape) < 0.2] = np.nan
    return y, p, np.array([f"p{i // 2:03d}" for i in range(n)])


def _hand_pooled_ece(pairs):
    """sum over 15 bins (b/15, (b+1)/15] of |sum (y - p)| / K, binned independently of the library."""
    gaps = [0.0] * 15
    for t, q in pairs:
        gaps[min(max(math.ceil(q * 15) - 1, 0), 14)] += t - q
    return sum(abs(g) for g in gaps) / len(pairs)


def test_multiclass_block_matches_sklearn_and_bootstrap():
    y, p, pid = _multiclass()
    block = outputs.evaluate_predictions("multiclass", y, p, pid, names=CLASSES, n_resamples=200, seed=3)
    assert block["accuracy"]["value"] == pytest.approx(accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert block["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)), abs=1e-12)
    assert block["auc_macro"]["value"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    for c, name in enumerate(CLASSES):
        assert block[f"auc/{name}"]["value"] == pytest.approx(roc_auc_score(y == c, p[:, c]), abs=1e-12)
    assert block["ece"]["value"] == pytest.approx(expected_calibration_error(y, p), abs=1e-15)
    direct = bootstrap_metrics("multiclass", y, p, pid, n_resamples=200, seed=3, names=CLASSES)
    for k, interval in direct.items():
        assert block[k] == interval.as_dict()
    assert list(block)[:4] == ["accuracy", "balanced_accuracy", "auc_macro", "ece"]
    assert block["auc_excluded"] == [] and block["n_images"] == 150 and block["n_patients"] == 50
    assert block["bootstrap"] == {"n_resamples": 200, "seed": 3, "confidence": 0.95, "unit": "patient"}
    assert 0 < block["accuracy"]["low"] < block["accuracy"]["value"] < block["accuracy"]["high"] < 1


def test_multilabel_block_matches_sklearn_bootstrap_and_hand_ece():
    y, p, pid = _multilabel()
    block = outputs.evaluate_predictions("multilabel", y, p, pid, names=LABELS, n_resamples=150, seed=5)
    aucs = []
    for k, name in enumerate(LABELS):
        known = ~np.isnan(y[:, k])
        aucs.append(roc_auc_score(y[known, k], p[known, k]))
        assert block[f"auc/{name}"]["value"] == pytest.approx(aucs[-1], abs=1e-12)
    assert block["auc_mean"]["value"] == pytest.approx(np.mean(aucs), abs=1e-12)
    direct = bootstrap_metrics("multilabel", y, p, pid, n_resamples=150, seed=5, names=LABELS)
    for k, interval in direct.items():
        assert block[k] == interval.as_dict()
    assert set(block) - set(direct) == {"ece", "auc_excluded", "n_images", "n_patients", "bootstrap"}
    assert list(block)[:2] == ["auc_mean", "ece"]

    # ECE interval: the documented patient draws, each resample materialized and computed by hand
    known = ~np.isnan(y)
    ids, pidx = np.unique(pid, return_inverse=True)
    pairs_of = [[(y[i, k], p[i, k]) for i in np.flatnonzero(pidx == j) for k in np.flatnonzero(known[i])]
                for j in range(len(ids))]
    draws = np.random.default_rng(5).integers(0, len(ids), size=(150, len(ids)))
    values = [_hand_pooled_ece([pair for j in row for pair in pairs_of[j]]) for row in draws]
    ece = block["ece"]
    assert ece["value"] == pytest.approx(_hand_pooled_ece([pair for ps in pairs_of for pair in ps]), abs=1e-12)
    assert ece["low"] == pytest.approx(np.percentile(values, 2.5), abs=1e-12)
    assert ece["high"] == pytest.approx(np.percentile(values, 97.5), abs=1e-12)
    assert ece["n_defined"] == 150


def test_pooled_binary_ece_tiny_example_by_hand():
    nan = np.nan
    y = np.array([[1, nan], [0, 1], [nan, 0], [0, nan]])
    p = np.array([[0.9, 0.3], [0.25, 0.65], [0.5, 0.1], [0.88, 0.4]])
    # known pairs (y, p): (1, .9) (0, .88) in bin 13 = (13/15, 14/15]; (0, .25) bin 3; (1, .65) bin 9; (0, .1) bin 1
    # ECE = 2/5 |0.5 - 0.89| + 1/5 |0 - 0.25| + 1/5 |1 - 0.65| + 1/5 |0 - 0.1| = 0.156 + 0.05 + 0.07 + 0.02
    assert outputs.pooled_binary_ece(y, p) == pytest.approx(0.296, abs=1e-12)
    bins = outputs.pooled_calibration_bins(y, p)
    assert bins.count[[1, 3, 9, 13]].tolist() == [1, 1, 1, 2] and bins.count.sum() == 5
    assert bins.accuracy[13] == 0.5 and bins.confidence[13] == pytest.approx(0.89)
    assert np.isnan(bins.accuracy[0]) and bins.ece == pytest.approx(0.296, abs=1e-12)
    weights = np.array([[1, 1, 1, 1], [2, 0, 1, 0]])  # row 2: pairs (1, .9) twice, (0, .1)
    assert outputs.pooled_ece_arrays(y, p, weights) == pytest.approx([0.296, (0.1 + 0.1 + 0.1) / 3], abs=1e-12)
    assert math.isnan(outputs.pooled_binary_ece(np.full((2, 2), nan), p[:2]))


def test_metrics_json_round_trip_null_for_absent_class(tmp_path):
    y, p, pid = _multiclass(n=90)
    y[y == 4] = 0  # "mass" absent: its AUC is undefined
    block = outputs.evaluate_predictions("multiclass", y, p, pid, names=CLASSES, n_resamples=50)
    assert block["auc/mass"] == {"value": None, "low": None, "high": None, "n_defined": 0}
    assert block["auc_excluded"] == ["mass"]
    meta = {"protocol": "linear", "names": tuple(CLASSES), "seed": np.int64(0), "lr": np.float64("nan")}
    path = tmp_path / "run" / "metrics.json"
    result = outputs.write_metrics_json(path, block, meta)
    text = path.read_text()
    assert "NaN" not in text and '"value": null' in text
    loaded = json.loads(text)
    assert loaded == result and loaded["metrics"] == block
    assert loaded["names"] == CLASSES and loaded["seed"] == 0 and loaded["lr"] is None
    assert text == json.dumps(loaded, indent=2, sort_keys=True) + "\n"
    assert [f.name for f in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_csv_exact_probabilities_sorted(tmp_path):
    y, p, pid = _multiclass(n=40)
    sids = np.array([f"s{i:02d}" for i in np.random.default_rng(2).permutation(40)])
    src = np.array([f"/data/img, {s}.dcm" for s in sids])  # a comma: the csv module quotes it
    args = dict(task="multiclass", names=CLASSES, sample_ids=sids, patient_ids=pid, sources=src)
    outputs.write_predictions_csv(tmp_path / "a.csv", labels=y, scores=p, **args)
    rows = _read_csv(tmp_path / "a.csv")
    assert list(rows[0]) == ["sample_id", "patient_id", "source", "label"] + [f"prob/{c}" for c in CLASSES] + [
        "predicted"]
    assert [r["sample_id"] for r in rows] == sorted(sids)
    for r in rows:
        i = int(np.flatnonzero(sids == r["sample_id"])[0])
        assert [float(r[f"prob/{c}"]) for c in CLASSES] == p[i].tolist()  # exact
        assert (r["patient_id"], r["source"], r["label"]) == (pid[i], src[i], CLASSES[y[i]])
        assert r["predicted"] == CLASSES[int(np.argmax(p[i]))]
    # another image order (e.g. two processes' shards concatenated) writes the same bytes
    perm = np.random.default_rng(3).permutation(40)
    outputs.write_predictions_csv(tmp_path / "b.csv", task="multiclass", names=CLASSES, sample_ids=sids[perm],
                                  patient_ids=pid[perm], sources=src[perm], labels=y[perm], scores=p[perm])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    with pytest.raises(EvaluationError, match="unique"):
        outputs.write_predictions_csv(tmp_path / "c.csv", labels=y, scores=p,
                                      **{**args, "sample_ids": np.r_[sids[:-1], sids[:1]]})


def test_predictions_csv_multilabel(tmp_path):
    y, p, pid = _multilabel(n=30)
    p = p.astype(np.float32)  # float32 scores come back as the same float64 value
    sids = [f"img{i:03d}" for i in range(30)][::-1]
    outputs.write_predictions_csv(tmp_path / "p.csv", task="multilabel", names=LABELS, sample_ids=sids,
                                  patient_ids=pid, sources=sids, labels=y, scores=p)
    rows = _read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["sample_id", "patient_id", "source"] + [f"label/{n}" for n in LABELS] + [
        f"prob/{n}" for n in LABELS]
    assert [r["sample_id"] for r in rows] == sorted(sids)
    for r in rows:
        i = sids.index(r["sample_id"])
        assert [r[f"label/{n}"] for n in LABELS] == ["" if np.isnan(v) else str(int(v)) for v in y[i]]
        assert [float(r[f"prob/{n}"]) for n in LABELS] == p[i].astype(np.float64).tolist()


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_plots_are_png(tmp_path):
    y, p, _ = _multiclass()
    outputs.plot_confusion_matrix(tmp_path / "cm.png", y, p, CLASSES)
    outputs.plot_reliability(tmp_path / "rel.png", "multiclass", y, p)
    ym, pm, _ = _multilabel()
    outputs.plot_reliability(tmp_path / "rel_ml.png", "multilabel", ym, pm)
    for name in ("cm.png", "rel.png", "rel_ml.png"):
        _check_png(tmp_path / name)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["cm.png", "rel.png", "rel_ml.png"]


def test_summary_table_order_and_undefined():
    y, p, pid = _multiclass(n=60)
    y[y == 2] = 1
    block = outputs.evaluate_predictions("multiclass", y, p, pid, names=CLASSES, n_resamples=30)
    table = outputs.summary_table(json.loads(json.dumps(block)), "linear on test")
    rows = table.columns[0]._cells
    assert rows[:4] == ["accuracy", "balanced_accuracy", "auc_macro", "ece"]
    assert rows[4:] == [f"auc/{c}" for c in CLASSES]
    assert table.columns[1]._cells[4 + 2] == "n/a" and "covid" in table.caption
    console = Console(file=io.StringIO(), width=120)
    outputs.print_summary(block, "linear on test", console=console)
    out = console.file.getvalue()
    assert "linear on test" in out and "95% CI" in out and f"{block['accuracy']['value']:.4f}" in out
