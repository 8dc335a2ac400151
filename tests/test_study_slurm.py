"""The study's Slurm backend on the one-node test cluster, with real sbatch: the cells as job arrays of
launch/slurm/study.sbatch (the cells that share cached features after the one that extracts them), then the
aggregation job; a resubmission of the finished study submits nothing.

A random init against a real torchvision-format state_dict (torchvision.models.resnet18()), kNN, 32 px.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services import SEARCH_PATH
from shardtools import REPO
from test_study import read_csv, write_study

pytestmark = pytest.mark.slurm


def test_the_slurm_backend_runs_the_cell_arrays_then_the_aggregation(slurm_cluster, monitor_shards, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(3)
    tv = tmp_path / "resnet18_torchvision.pt"
    torch.save(torchvision.models.resnet18().state_dict(), tv)  # with its fc.*, which the eval job drops
    cfg = write_study(tmp_path / "s.yaml", monitor_shards, {"model.small_input": False},  # torchvision's stem
                      inits={"random": None, "tv": str(tv)}, protocols=["knn"], backend="slurm",
                      slurm={"time": "00:15:00", "cpus_per_task": 1})
    d = tmp_path / "study"
    env = {**os.environ, "PATH": SEARCH_PATH, **slurm_cluster.env, "OMP_NUM_THREADS": "1"}
    sub = subprocess.run([sys.executable, str(REPO / "launch" / "study.py"), "--config", str(cfg)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    jobs = json.loads((d / "slurm" / "jobs.json").read_text())
    names = [c["name"] for c in json.loads((d / "cells.json").read_text())["cells"]]
    assert names == ["random/knn/f0.5/s0", "random/knn/f1.0/s0", "tv/knn/f0.5/s0", "tv/knn/f1.0/s0"]
    # First array: each cache group's 100% cell; second (afterany the first): the 50% cells, from the cache.
    assert [a["cells"] for a in jobs["arrays"]] == [[1, 3], [0, 2]]
    assert [a["array"] for a in jobs["arrays"]] == ["1,3", "0,2"]

    state = slurm_cluster.wait(jobs["aggregate"], timeout=400)
    agg_log = (d / "slurm" / f"aggregate-{jobs['aggregate']}.out").read_text()
    for a in jobs["arrays"]:
        for i in a["cells"]:
            task_log = (d / "slurm" / f"cell-{a['job']}_{i}.out").read_text()
            assert slurm_cluster.state(f"{a['job']}_{i}") == "COMPLETED", task_log + agg_log
            assert f"medssl-study: cell {i} of {d}" in task_log
    assert state == "COMPLETED", agg_log
    assert "aggregated 4 of 4 cells" in agg_log
    rows = read_csv(d / "label_efficiency.csv")
    assert [r["status"] for r in rows] == ["done"] * 4
    assert all(float(r["value"]) > 0 for r in rows)
    m = json.loads((d / rows[3]["cell"] / "metrics.json").read_text())
    assert m["encoder_source"] == "state_dict" and m["protocol"] == "knn"
    for name in ("label_efficiency.png", "summary.md", "headline.json"):
        assert (d / name).stat().st_size > 0
    assert "from the cache" in (d / rows[2]["cell"] / "log.txt").read_text()

    # Resubmitting the finished study submits nothing: it aggregates at once.
    again = subprocess.run([sys.executable, str(REPO / "launch" / "study.py"), "--config", str(cfg)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 done, 0 to run" in again.stdout and "submitted" not in again.stdout
    assert json.loads((d / "slurm" / "jobs.json").read_text()) == jobs
