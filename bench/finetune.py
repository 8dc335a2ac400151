"""Evaluation on HAM10000: our linear probe against scikit-learn on the same features; prints one JSON line.

Features: a randomly initialised ResNet-18 (torch.manual_seed(0), small_input, eval mode, no grad, batch
256) on the real HAM10000 images decoded with PIL, resized to 64 x 64 and normalised with ImageNet's
mean / std, extracted once by a plain torch loop and cached under --cache (the extraction is not timed
here). The images are split by lesion (one image per lesion in the subset) into 60 / 20 / 20 train / val /
test with a seeded permutation of the lesion ids.

probe: `fit_probe_sweep` (the L2 grid DEFAULT_L2_GRID, 13 strengths, selected by validation accuracy;
test accuracy of the returned probe, which is refit in float64 to max |grad| <= 1e-7) against
scikit-learn's LogisticRegression(solver="lbfgs") swept over the same C values (C = 1 / (l2 * n_train))
on the same standardized train features, selected the same way (validation accuracy, ties keep the
larger l2). scikit-learn gets its fastest fair configuration: the standardized features ready-made
(untimed) in float32 (2.7x faster than float64 here), one estimator with warm_start=True refit down the
grid from the strongest penalty (as ours is), its default tol 1e-4 (the sweep tolerance ours uses, on the
same max |gradient| of the same objective), max_iter=10000 (a ConvergenceWarning would abort the run),
1 BLAS thread (--sklearn-threads; on the shared 2-core machine 2 threads took 3x as long). Ours runs with
--threads torch threads (default 1: on the shared cores 2 OpenMP threads spin against other jobs and
took 3-8x as long). The two sides alternate for --rounds rounds; medians are reported. Goal:
probe_speedup_vs_sklearn >= 3 with the test accuracies within 0.5 points.

extract, finetune: the job's feature extraction and one fine-tune epoch against plain torch loops on the
same model and images (bench/finetune_loops.py: extract_ratio_vs_loop, goal >= 1.0;
finetune_ratio_vs_loop, goal >= 0.9), on labelled 64 px shards of the first 1024 HAM10000 rows.

Each measurement is one function returning its keys (MEASUREMENTS); main() merges them into the one
JSON line. If the data folder is absent the line is {"bench": "finetune", "skipped": reason}, exit 0.

    .venv/bin/python bench/finetune.py [--data /work/shared/data/ham10000_subset] [--rounds 3]
                                       [--only probe|extract|finetune] [--threads 1] [--sklearn-threads 1]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info, threadpool_limits

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medssl_scale.evaluate.probe import DEFAULT_L2_GRID, fit_probe_sweep  # noqa: E402
from medssl_scale.models import build_backbone  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data/ham10000_subset")
DEFAULT_CACHE = Path("/tmp/medssl-bench-cache")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE, BATCH, SEED = 64, 256, 0


def _rows(data: Path) -> list[dict]:
    with open(data / "metadata.csv", newline="") as f:
        return list(csv.DictReader(f))


def split_by_lesion(lesions: list[str], seed: int = SEED) -> dict[str, np.ndarray]:
    """Row indices of train / val / test: 60 / 20 / 20 of a seeded permutation of the sorted lesion ids."""
    ids = sorted(set(lesions))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train, n_val = int(round(0.6 * len(ids))), int(round(0.2 * len(ids)))
    part = {}
    for name, sel in (("train", order[:n_train]), ("val", order[n_train:n_train + n_val]),
                      ("test", order[n_train + n_val:])):
        for i in sel:
            part[ids[i]] = name
    where = np.array([part[lesion] for lesion in lesions])
    return {name: np.flatnonzero(where == name) for name in ("train", "val", "test")}


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.uint8)


@torch.no_grad()
def extract_loop(data: Path, rows: list[dict]) -> np.ndarray:
    """Features (N, 512) float32 of the images in rows: a plain loop, decode + forward batch by batch."""
    torch.manual_seed(SEED)
    model = build_backbone(18, 1, small_input=True).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for start in range(0, len(rows), BATCH):
        imgs = np.stack([_load_image(data / r["path"]) for r in rows[start:start + BATCH]])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(model((x - mean) / std).float().numpy())
    return np.concatenate(out)


def features(data: Path, cache: Path) -> dict[str, np.ndarray]:
    """Cached features, labels (class index of dx, sorted names) and lesion ids of every image in data."""
    rows = _rows(data)
    key = hashlib.sha256(json.dumps([[r["path"], r["lesion_id"], r["dx"]] for r in rows]).encode()
                         + f"resnet18-small-{SIZE}-seed{SEED}-torch{torch.__version__}".encode()).hexdigest()[:16]
    file = cache / f"ham_features_{key}.npz"
    if not file.exists():
        cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        feats = extract_loop(data, rows)
        print(f"extracted {feats.shape} in {time.perf_counter() - start:.0f} s -> {file}", file=sys.stderr)
        tmp = file.with_suffix(".tmp.npz")
        np.savez(tmp, features=feats)
        os.replace(tmp, file)
    classes = sorted({r["dx"] for r in rows})
    return {"features": np.load(file)["features"],
            "labels": np.array([classes.index(r["dx"]) for r in rows], dtype=np.int64),
            "lesions": [r["lesion_id"] for r in rows], "classes": classes}


def _ours(xtr, ytr, xva, yva, xte, yte, grid, num_classes):
    start = time.perf_counter()
    sweep = fit_probe_sweep(xtr, ytr, xva, yva, task="multiclass", l2_grid=grid, num_outputs=num_classes)
    elapsed = time.perf_counter() - start
    acc = float((sweep.probe.predict_proba(xte).argmax(1).numpy() == yte).mean())
    return elapsed, acc, sweep.l2, sum(row["n_iter"] for row in sweep.table)


def _sklearn(xtr_s, ytr, xva_s, yva, xte_s, yte, grid):
    """The same sweep with LogisticRegression(lbfgs): strongest penalty first, warm-started, val accuracy."""
    n = len(ytr)
    start = time.perf_counter()
    clf = LogisticRegression(solver="lbfgs", max_iter=10_000, warm_start=True)
    best, n_iter = None, 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # a non-converged fit would be no comparison
        for l2 in sorted(grid, reverse=True):
            clf.set_params(C=1.0 / (l2 * n)).fit(xtr_s, ytr)
            n_iter += int(clf.n_iter_.max())
            value = float((clf.predict(xva_s) == yva).mean())
            if best is None or value > best[0]:  # ties keep the larger l2
                best = (value, l2, clf.coef_.copy(), clf.intercept_.copy())
    elapsed = time.perf_counter() - start
    _, l2, coef, intercept = best
    acc = float(((xte_s @ coef.T + intercept).argmax(1) == yte).mean())
    return elapsed, acc, l2, n_iter


def _blas_threads() -> int:
    return max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=0)


def measure_probe(args: argparse.Namespace) -> dict:
    """probe_speedup_vs_sklearn: our sweep vs scikit-learn's on the same grid, features and split."""
    feats = features(args.data, args.cache)
    x, y = feats["features"], feats["labels"]
    idx = split_by_lesion(feats["lesions"])
    (xtr, ytr), (xva, yva), (xte, yte) = ((x[idx[s]], y[idx[s]]) for s in ("train", "val", "test"))
    grid = list(DEFAULT_L2_GRID)
    # scikit-learn gets the standardized features ready-made (the train statistics, computed in float64,
    # untimed), by default in float32, its faster dtype here (float64: 42 s a sweep against 15 s)
    mean, std = xtr.astype(np.float64).mean(0), xtr.astype(np.float64).std(0)
    std = np.where(std > 1e-12 * (1.0 + np.abs(mean)), std, 1.0)
    xtr_s, xva_s, xte_s = (((a - mean) / std).astype(args.sklearn_dtype) for a in (xtr, xva, xte))
    k = len(feats["classes"])
    ours, theirs = [], []
    for _ in range(args.rounds):  # alternating, so that load from other jobs hits both sides alike
        ours.append(_ours(xtr, ytr, xva, yva, xte, yte, grid, k))
        with threadpool_limits(limits=args.sklearn_threads, user_api="blas"):
            sk_blas = _blas_threads()
            theirs.append(_sklearn(xtr_s, ytr, xva_s, yva, xte_s, yte, grid))
    ours_s = statistics.median(r[0] for r in ours)
    sk_s = statistics.median(r[0] for r in theirs)
    ours_acc, sk_acc = ours[-1][1], theirs[-1][1]
    return {"n_train": len(ytr), "n_val": len(yva), "n_test": len(yte), "dim": x.shape[1], "classes": k,
            "grid_size": len(grid), "ours_s": round(ours_s, 3), "sklearn_s": round(sk_s, 3),
            "probe_speedup_vs_sklearn": round(sk_s / ours_s, 2),
            "ours_test_acc": round(ours_acc, 4), "sklearn_test_acc": round(sk_acc, 4),
            "acc_diff_points": round(100 * abs(ours_acc - sk_acc), 2),
            "ours_l2": ours[-1][2], "sklearn_l2": theirs[-1][2],
            "ours_sweep_iters": ours[-1][3], "sklearn_sweep_iters": theirs[-1][3],
            "ours_rounds_s": [round(r[0], 3) for r in ours], "sklearn_rounds_s": [round(r[0], 3) for r in theirs],
            "rounds": args.rounds, "torch_threads": torch.get_num_threads(), "sklearn_blas_threads": sk_blas,
            "sklearn_dtype": args.sklearn_dtype}


def _loop_shards(args) -> Path:
    from finetune_loops import build_shards
    return build_shards(args.data, args.cache / "shards-1024")


def measure_extract_loop(args) -> dict:
    from finetune_loops import measure_extract
    return measure_extract(_loop_shards(args), args.rounds)


def measure_finetune_loop(args) -> dict:
    from finetune_loops import measure_finetune
    return measure_finetune(_loop_shards(args), args.rounds)


# One function per measurement, each returning its keys of the JSON line (loops: bench/finetune_loops.py).
MEASUREMENTS = {"probe": measure_probe, "extract": measure_extract_loop, "finetune": measure_finetune_loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help=f"torch's intra-op threads for ours (default 1; this machine has "
                             f"{len(os.sched_getaffinity(0))} cores, shared)")
    parser.add_argument("--sklearn-threads", type=int, default=1,
                        help="scikit-learn's BLAS threads (default 1: its faster setting on the shared 2-core "
                             "machine, 15 s a sweep against 50 s with 2)")
    parser.add_argument("--sklearn-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), action="append",
                        help="run only this measurement (repeatable); default: all")
    args = parser.parse_args()
    result = {"bench": "finetune"}
    if not (args.data / "metadata.csv").exists():
        result["skipped"] = f"no HAM10000 data at {args.data} (metadata.csv missing)"
        print(json.dumps(result))
        return
    torch.set_num_threads(args.threads)
    result["ham_images"] = len(_rows(args.data))
    for name in args.only or list(MEASUREMENTS):
        result.update(MEASUREMENTS[name](args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
