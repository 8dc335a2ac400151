"""Benchmark `medssl-shard build` against plain baselines on HAM10000; prints one JSON line.

1. Resize (long side to --max-side): our build with 2 workers vs a single-process loop that does the
   same per-image work (sharding.images.encode_image) and writes with webdataset's ShardWriter.
2. Copy (--max-side 0): our build vs copying the same files into a tar with the tarfile module.
Goals (issue 2): 2 workers >= 1.8x the ShardWriter loop; copy >= 0.5x the tarfile copy.

On a shared machine one run of each proves little (load from others hits them unequally), so both
comparisons run in --rounds alternating rounds (ours, baseline, ours, baseline, ...); each round gives
one ratio from two adjacent runs, and the reported figures are the medians, with every round listed.
Our build with 1 worker runs once, for reference. The CPU seconds of our 2-worker build's main process
and workers are listed too: the main process's share is the serial part of a build.

    .venv/bin/python bench/shard.py [--data ../shared/data/ham10000_subset] [--rounds 5] [--limit N]
                                    [--max-side 128]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
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


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _ours(data: Path, manifest: Path, out: Path, workers: int, max_side: int, cpu: dict | None = None) -> float:
    """Seconds of one build; `cpu` collects the CPU seconds of its main process and of its workers."""
    opts = BuildOptions(source=str(data), output=str(out), manifest=str(manifest), patient_col="lesion_id",
                        label_cols=["dx"], max_side=max_side, workers=workers, shard_size=64 * 10**6)
    main, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    build(opts, show_progress=False)
    elapsed = time.perf_counter() - start
    if cpu is not None:  # the workers have exited (and been waited for) when build() returns
        cpu.setdefault("main", []).append(round(_cpu(resource.RUSAGE_SELF) - main, 2))
        cpu.setdefault("workers", []).append(round(_cpu(resource.RUSAGE_CHILDREN) - children, 2))
    shutil.rmtree(out)
    return elapsed


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
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return elapsed


def _tarfile_copy(data: Path, rows: list[dict], out: Path) -> float:
    start = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for row in rows:
            tar.add(data / row["path"], arcname=row["path"].replace("/", "_"))
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def _rounds(rounds: int, ours, baseline) -> list[tuple[float, float]]:
    """(ours seconds, baseline seconds) per round, run alternately so that load drifts hit both."""
    return [(ours(), baseline()) for _ in range(rounds)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000_subset")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of each comparison [5]")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ap.add_argument("--max-side", type=int, default=128, help="resize target for the resize comparison")
    a = ap.parse_args()
    if not (a.data / "metadata.csv").exists():
        sys.exit(f"bench/shard.py: {a.data}/metadata.csv not found: pass --data")
    if a.rounds < 1:
        sys.exit("bench/shard.py: --rounds must be at least 1")
    rows = _rows(a.data, a.limit)
    n = len(rows)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = tmp / "rows.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        # Warm the page cache so the first timed run does not pay for cold reads alone.
        _tarfile_copy(a.data, rows, tmp / "warm.tar")
        cpu: dict[str, list[float]] = {}
        resize = _rounds(a.rounds, lambda: _ours(a.data, manifest, tmp / "o2", 2, a.max_side, cpu),
                         lambda: _shardwriter_loop(a.data, rows, tmp / "wds", a.max_side))
        copy = _rounds(a.rounds, lambda: _ours(a.data, manifest, tmp / "oc", 2, 0),
                       lambda: _tarfile_copy(a.data, rows, tmp / "copy.tar"))
        one_worker = _ours(a.data, manifest, tmp / "o1", 1, a.max_side)

    def rates(pairs, i):
        return [round(n / p[i], 1) for p in pairs]

    per_round = {
        "ours_2_workers_images_per_s": rates(resize, 0), "shardwriter_loop_images_per_s": rates(resize, 1),
        "speedup_vs_shardwriter": [round(b / o, 3) for o, b in resize],
        "ours_copy_images_per_s": rates(copy, 0), "tarfile_copy_images_per_s": rates(copy, 1),
        "copy_ratio_vs_tarfile": [round(b / o, 3) for o, b in copy],
        # CPU seconds of our 2-worker resize build, which load from other processes changes far less
        # than wall time: the main process's share is the serial part.
        "ours_2_workers_main_cpu_s": cpu["main"], "ours_2_workers_worker_cpu_s": cpu["workers"],
    }
    medians = {k: round(statistics.median(v), 3 if "ratio" in k or "speedup" in k else 2 if "cpu" in k else 1)
               for k, v in per_round.items()}
    shardwriter = medians["shardwriter_loop_images_per_s"]
    print(json.dumps({
        "bench": "shard", "images": n, "max_side": a.max_side, "rounds": a.rounds,
        "cpus": os.cpu_count(), "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
        **medians,
        "ours_1_worker_images_per_s": round(n / one_worker, 1),
        "speedup_1_worker_vs_shardwriter": round(n / one_worker / shardwriter, 3),
        "statistic": "median over rounds",
        "per_round": per_round,
        "goals": {"speedup_vs_shardwriter": 1.8, "copy_ratio_vs_tarfile": 0.5},
    }))


if __name__ == "__main__":
    main()
