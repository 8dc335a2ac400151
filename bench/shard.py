"""Benchmark `medssl-shard build` against plain baselines on HAM10000; prints one JSON line.

1. Resize (long side to --max-side): our build with 1 and 2 workers vs a single-process loop that does
   the same per-image work (sharding.images.encode_image) and writes with webdataset's ShardWriter.
2. Copy (--max-side 0): our build vs copying the same files into a tar with the tarfile module.
Goals (issue 2): 2 workers >= 1.8x the ShardWriter loop; copy >= 0.5x the tarfile copy.

    .venv/bin/python bench/shard.py [--data ../shared/data/ham10000_subset] [--limit N] [--max-side 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sharding.build import build  # noqa: E402
from sharding.images import encode_image  # noqa: E402
from sharding.options import BuildOptions  # noqa: E402


def _rows(data: Path, limit: int | None) -> list[dict]:
    with open(data / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:limit] if limit else rows


def _ours(data: Path, manifest: Path, out: Path, workers: int, max_side: int) -> float:
    opts = BuildOptions(source=str(data), output=str(out), manifest=str(manifest), patient_col="lesion_id",
                        label_cols=["dx"], max_side=max_side, workers=workers, shard_size=64 * 10**6)
    start = time.perf_counter()
    build(opts, show_progress=False)
    return time.perf_counter() - start


def _shardwriter_loop(data: Path, rows: list[dict], out: Path, max_side: int) -> float:
    import webdataset as wds

    out.mkdir(parents=True)
    start = time.perf_counter()
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=64 * 10**6, verbose=0) as sink:
        for i, row in enumerate(rows):
            raw = (data / row["path"]).read_bytes()
            enc = encode_image(raw, row["path"], max_side)
            meta = {"patient_id": row["lesion_id"], "source": row["path"], "labels": {"dx": row["dx"]}}
            sink.write({"__key__": f"s{i:07d}", enc.ext: enc.data, "json": json.dumps(meta).encode()})
    return time.perf_counter() - start


def _tarfile_copy(data: Path, rows: list[dict], out: Path) -> float:
    start = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for row in rows:
            tar.add(data / row["path"], arcname=row["path"].replace("/", "_"))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000_subset")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ap.add_argument("--max-side", type=int, default=128, help="resize target for the resize comparison")
    a = ap.parse_args()
    if not (a.data / "metadata.csv").exists():
        sys.exit(f"bench/shard.py: {a.data}/metadata.csv not found: pass --data")
    rows = _rows(a.data, a.limit)
    n = len(rows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = tmp / "rows.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        # Warm the page cache so the first timed run does not pay for cold reads alone.
        _tarfile_copy(a.data, rows, tmp / "warm.tar")
        t = {
            "shardwriter_loop": _shardwriter_loop(a.data, rows, tmp / "wds", a.max_side),
            "ours_1_worker": _ours(a.data, manifest, tmp / "o1", 1, a.max_side),
            "ours_2_workers": _ours(a.data, manifest, tmp / "o2", 2, a.max_side),
            "tarfile_copy": _tarfile_copy(a.data, rows, tmp / "copy.tar"),
            "ours_copy": _ours(a.data, manifest, tmp / "oc", 2, 0),
        }
        shutil.rmtree(tmp / "wds")
    rate = {k: n / v for k, v in t.items()}
    print(json.dumps({
        "bench": "shard", "images": n, "max_side": a.max_side,
        **{f"{k}_images_per_s": round(v, 1) for k, v in rate.items()},
        "speedup_vs_shardwriter": round(rate["ours_2_workers"] / rate["shardwriter_loop"], 3),
        "speedup_1_worker_vs_shardwriter": round(rate["ours_1_worker"] / rate["shardwriter_loop"], 3),
        "copy_ratio_vs_tarfile": round(rate["ours_copy"] / rate["tarfile_copy"], 3),
        "goals": {"speedup_vs_shardwriter": 1.8, "copy_ratio_vs_tarfile": 0.5},
    }))


if __name__ == "__main__":
    main()
