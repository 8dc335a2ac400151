"""Benchmark the pair pipeline: DALI CPU-only vs torchvision on the same shards and policy; one JSON line.

Shards of ../shared/data/ham10000_subset (224-px JPEGs, bytes kept) are built into a temporary folder,
then both backends run the SimCLR preset at 224 px, MICLe mode, batch 64, for the same steps.
Goal (issue 3): DALI CPU (2 threads) >= 1.4x torchvision (2 DataLoader workers).

    .venv/bin/python bench/pipeline.py [--data DIR] [--steps 12] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medssl_scale.augment.policy import preset  # noqa: E402
from medssl_scale.data.reader import ShardPairSource  # noqa: E402
from medssl_scale.data.shardset import ShardSet  # noqa: E402
from sharding.build import build  # noqa: E402
from sharding.options import BuildOptions  # noqa: E402


def _pairs_per_second(loader, steps: int, warmup: int = 2) -> float:
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):  # pipeline start-up, worker start, first decodes
        next(it)
    start, pairs = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(it)
        pairs += int(batch.valid.sum())
    elapsed = time.perf_counter() - start
    del it
    return pairs / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ham10000_subset")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    if not (a.data / "metadata.csv").exists():
        sys.exit(f"bench/pipeline.py: {a.data}/metadata.csv not found: pass --data")
    from medssl_scale.augment.dali_backend import DaliPairLoader
    from medssl_scale.augment.torchvision_loader import TorchvisionPairLoader

    policy = preset("simclr", size=224)
    with tempfile.TemporaryDirectory() as tmp:
        build(BuildOptions(source=str(a.data), output=tmp, manifest=str(a.data / "metadata.csv"),
                           patient_col="lesion_id", max_side=0, splits={"train": 1.0}), show_progress=False)
        shardset = ShardSet.open(tmp, "train")

        def source():
            return ShardPairSource(shardset, 0, 1, a.batch, mode="micle")

        torch_rate = _pairs_per_second(TorchvisionPairLoader(source(), policy, num_workers=2), a.steps)
        dali_rate = _pairs_per_second(DaliPairLoader(source(), policy, device_id=None, num_threads=2), a.steps)
    print(json.dumps({
        "bench": "pipeline", "size": 224, "batch": a.batch, "steps": a.steps, "policy": "simclr", "mode": "micle",
        "torchvision_2_workers_pairs_per_s": round(torch_rate, 1),
        "dali_cpu_2_threads_pairs_per_s": round(dali_rate, 1),
        "dali_cpu_vs_torch": round(dali_rate / torch_rate, 3),
        "goal": {"dali_cpu_vs_torch": 1.4},
    }))


if __name__ == "__main__":
    main()
