"""The multilabel (CheXpert-style) evaluation job in process, on generated shards.

Five conditions with values 1.0 / 0.0 / -1.0 / blank; Edema is written in the image (bright when present,
dark when absent) so a probe on a random ResNet-18 learns it. The splits come from a fold column, so every
split holds both values of every condition. metrics.json must agree with scikit-learn on predictions.csv.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from medssl_scale.finetune.config import load_eval_config
from medssl_scale.finetune.labels import CHEXPERT_CONDITIONS
from shardtools import run_cli, write_csv

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/cxr_multilabel.yaml")
SPLITS = ("train", "val", "test")
VALUES = ("1.0", "0.0", "-1.0", "")
SMALL = ["protocol=linear", "model.depth=18", "model.small_input=false", "preprocess.size=32", "data.workers=0",
         "report.n_resamples=100", "linear.l2_grid=[1.0e-4,1.0e-2,1.0]"]


def _image(bright: bool, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = 190 if bright else 60
    arr = np.clip(base + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _row(p: int, k: int) -> dict:
    """Condition values of image k of patient p: Edema follows the image; the others cycle through VALUES."""
    i = p // 3 + k  # consecutive within each split (p % 3 picks the split)
    row = {c: VALUES[(i + j) % 4] for j, c in enumerate(CHEXPERT_CONDITIONS) if c != "Edema"}
    row["Edema"] = ("1.0", "1.0", "0.0", "0.0", "-1.0", "")[i % 6]
    if p == 5 and k == 0:  # a test image with no condition known: left out under ignore
        row = {c: ("-1.0" if c == "Edema" else "") for c in CHEXPERT_CONDITIONS}
    return row


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr")
    src = root / "images"
    rows = []
    for p in range(48):
        for k in range(1 + p % 2):
            rel = f"pat{p:02d}/view{k}.jpg"
            values = _row(p, k)
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(_image(values["Edema"] in ("1.0", "-1.0"), seed=p * 10 + k))
            rows.append({"Path": rel, "patient_id": f"pat{p:02d}", "fold": SPLITS[p % 3], **values})
    write_csv(src / "train.csv", rows)
    out = root / "shards"
    run_cli("build", src, out, "--manifest", src / "train.csv", "--image-col", "Path", "--patient-col", "patient_id",
            "--label-cols", ",".join(CHEXPERT_CONDITIONS), "--split-col", "fold", "--workers", "1", "--quiet")
    return {"shards": out, "rows": {r["Path"]: r for r in rows}, "runs": root / "runs"}


def _run(cxr, name: str, *overrides: str) -> tuple[dict, list[dict], Path]:
    from medssl_scale.finetune.job import run

    run_dir = cxr["runs"] / name
    cfg = load_eval_config(CONFIG, [*SMALL, f"data.shards={cxr['shards']}", f"run_dir={run_dir}", *overrides])
    result = run(cfg, log=lambda *a: None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == result
    with open(run_dir / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    return metrics, preds, run_dir


def _check_aucs_against_sklearn(metrics: dict, preds: list[dict]) -> dict:
    m = metrics["metrics"]
    aucs = {}
    for name in CHEXPERT_CONDITIONS:
        known = [r for r in preds if r[f"label/{name}"] != ""]
        y = np.array([int(r[f"label/{name}"]) for r in known])
        s = np.array([float(r[f"prob/{name}"]) for r in known])
        assert set(y.tolist()) == {0, 1}, name  # the data make every AUC defined
        aucs[name] = roc_auc_score(y, s)
        assert m[f"auc/{name}"]["value"] == pytest.approx(aucs[name], abs=1e-12), name
        assert m[f"auc/{name}"]["low"] is not None and m[f"auc/{name}"]["high"] is not None
    assert m["auc_mean"]["value"] == pytest.approx(float(np.mean(list(aucs.values()))), abs=1e-12)
    assert m["auc_excluded"] == []
    return aucs


def _source_values(cxr, row: dict) -> dict:
    return cxr["rows"][row["source"]]


def test_linear_ignore_matches_sklearn_on_predictions(cxr, one_thread):
    metrics, preds, run_dir = _run(cxr, "linear-ignore")
    assert metrics["task"] == "multilabel" and metrics["names"] == list(CHEXPERT_CONDITIONS)
    assert metrics["protocol"] == "linear" and metrics["labels"]["columns"] == list(CHEXPERT_CONDITIONS)
    assert {"l2", "sweep"} <= set(metrics["selection"])
    test_rows = [r for r in cxr["rows"].values() if r["fold"] == "test"]
    with_a_label = [r for r in test_rows if any(r[c] in ("1.0", "0.0") for c in CHEXPERT_CONDITIONS)]
    assert len(with_a_label) < len(test_rows)  # the all-unknown image (patient 5) is left out
    assert len(preds) == metrics["n_test_images"] == metrics["metrics"]["n_images"] == len(with_a_label)
    assert {r["source"] for r in preds} == {r["Path"] for r in with_a_label}
    for r in preds:  # uncertain (-1) masked like blanks; 1.0 / 0.0 as 1 / 0
        src = _source_values(cxr, r)
        for c in CHEXPERT_CONDITIONS:
            assert r[f"label/{c}"] == {"1.0": "1", "0.0": "0", "-1.0": "", "": ""}[src[c]], (r["source"], c)
    aucs = _check_aucs_against_sklearn(metrics, preds)
    assert aucs["Edema"] > 0.9  # written in the image
    assert (run_dir / "model.pt").exists() and (run_dir / "reliability.png").exists()


def test_linear_uncertain_as_ones(cxr, one_thread):
    metrics, preds, _ = _run(cxr, "linear-ones", "task.uncertain=ones")
    n_uncertain = 0
    for r in preds:
        src = _source_values(cxr, r)
        for c in CHEXPERT_CONDITIONS:
            assert r[f"label/{c}"] == {"1.0": "1", "0.0": "0", "-1.0": "1", "": ""}[src[c]], (r["source"], c)
            n_uncertain += src[c] == "-1.0"
    assert n_uncertain > 0
    test_rows = [r for r in cxr["rows"].values() if r["fold"] == "test"]
    assert len(preds) == len(test_rows)  # an uncertain label is now known: no image left out
    _check_aucs_against_sklearn(metrics, preds)


def test_knn_records_the_selected_k(cxr, one_thread):
    metrics, preds, run_dir = _run(cxr, "knn", "protocol=knn", "knn.k=[5]")
    assert metrics["protocol"] == "knn"
    assert metrics["selection"]["k"] == 5 and metrics["selection"]["temperature"] == pytest.approx(0.07)
    _check_aucs_against_sklearn(metrics, preds)
    assert (run_dir / "model.pt").exists()
