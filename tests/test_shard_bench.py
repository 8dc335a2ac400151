"""bench/shard.py's report: alternating rounds, medians of the per-round figures (no timing is judged)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from shardtools import REPO, write_csv, write_image


def test_bench_reports_medians_of_alternating_rounds(tmp_path):
    rows = []
    for i in range(24):
        rel = f"images/ISIC_{i:07d}.jpg"
        write_image(tmp_path / rel, i, size=(96, 72))
        rows.append({"path": rel, "lesion_id": f"HAM_{i // 3:07d}", "dx": "nv" if i % 2 else "mel"})
    write_csv(tmp_path / "metadata.csv", rows)
    proc = subprocess.run([sys.executable, "bench/shard.py", "--data", str(tmp_path), "--rounds", "3",
                           "--max-side", "32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["images"] == 24 and r["rounds"] == 3 and r["statistic"] == "median over rounds"
    per_round = r["per_round"]
    for key in ("ours_2_workers_images_per_s", "shardwriter_loop_images_per_s", "speedup_vs_shardwriter",
                "ours_copy_images_per_s", "tarfile_copy_images_per_s", "copy_ratio_vs_tarfile"):
        assert len(per_round[key]) == 3 and all(v > 0 for v in per_round[key]), key
        assert abs(r[key] - statistics.median(per_round[key])) < 1e-6, key
    assert len(per_round["ours_2_workers_main_cpu_s"]) == len(per_round["ours_2_workers_worker_cpu_s"]) == 3
    assert all(v > 0 for v in per_round["ours_2_workers_worker_cpu_s"])  # the workers did the encoding
    # Each round's ratio comes from that round's two adjacent runs.
    for ours, base, ratio in zip(per_round["ours_2_workers_images_per_s"], per_round["shardwriter_loop_images_per_s"],
                                 per_round["speedup_vs_shardwriter"]):
        assert abs(ours / base - ratio) < 0.01 * ratio
    assert r["goals"] == {"speedup_vs_shardwriter": 1.8, "copy_ratio_vs_tarfile": 0.5}
