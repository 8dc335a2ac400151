"""The label-efficiency study (launch/study.py): its config checks, cells and done-marker, the aggregation and
headline against hand-computed values on synthetic metrics.json files, and a real study on the shipped sample
(labelled by view, ResNet-18 at 32 px, linear probe) run twice, then resumed after a cell lost its result.

Shards: conftest's `monitor_shards` (data/sample_cxr labelled by finding and view, 70/30 by patient, 64 px).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shardtools import REPO

STUDY = REPO / "launch" / "study.py"
# Every cell: the view task (AP joins AP Supine), validation carved from train, the val split as test.
BASE = {"data.val_split": None, "data.test_split": "val", "data.workers": 0, "data.batch_size": 64,
        "task.column": "view", "task.mapping": {"AP": "AP Supine"}, "model.depth": 18, "model.small_input": True,
        "preprocess.size": 32, "report.n_resamples": 200}


def write_study(path: Path, shards, overrides: dict | None = None, **keys) -> Path:
    """A study config over `shards` with BASE (and `overrides`) for every cell, `keys` at the top level."""
    cells = {"data.shards": str(shards), **BASE, **(overrides or {})}
    doc = {"study_dir": str(path.parent / "study"), "base": {"config": None, "overrides": cells},
           "inits": {"random": None}, "protocols": ["linear"], "fractions": [0.5, 1.0], "seeds": [0], **keys}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def study(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STUDY), *map(str, args)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def launcher():
    """launch/study.py as a module, for in-process calls of its main() (no interpreter start-up per case)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_launcher", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """An encoder.pt as pretraining writes it (ResNet-18, 3x3 stem, 32 px recorded) and a file that is not one."""
    import torch

    from medssl_scale.models import build_backbone
    from medssl_scale.train.storage import save_encoder

    d = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(7)
    save_encoder(build_backbone(18, 1, small_input=True).state_dict(), str(d / "encoder.pt"),
                 {"depth": 18, "width": 1, "small_input": True, "input_size": 32, "mean": [0.5] * 3,
                  "std": [0.25] * 3, "preset": "chest_xray", "feature_dim": 512})
    (d / "notes.txt").write_text("not a torch file\n")
    return d


# ---------------------------------------------------------------- config and cells

def test_the_demo_config_loads_and_expands_to_its_twelve_cells(encoders):
    from medssl_scale.study.cells import expand, init_digests
    from medssl_scale.study.config import load_study_config

    s = load_study_config(str(REPO / "configs" / "study_demo.yaml"),
                          [f"inits.simclr={encoders / 'encoder.pt'}", f"inits.micle={encoders / 'encoder.pt'}"])
    cells = expand(s, init_digests(s))
    assert [c.name for c in cells] == [f"{i}/linear/f{f}/s{seed}" for i in ("random", "simclr", "micle")
                                       for f in ("0.5", "1.0") for seed in (0, 1)]
    assert all(Path(c.dir).is_relative_to(s.study_dir) for c in cells) and Path(s.study_dir).is_absolute()
    assert cells[0].config.label_fraction == 0.5 and cells[1].config.label_fraction == 0.5
    assert cells[2].config.label_fraction is None  # 1.0: every training patient, no draw
    assert cells[0].config.task.mapping == {"AP": "AP Supine"} and cells[0].config.data.val_split is None
    assert cells[4].encoder == str(encoders / "encoder.pt") and cells[0].encoder is None
    assert cells[8].encoder == str(encoders / "encoder.pt")
    # simclr and micle name the same file here: equal configs, in folders of their own
    assert len({c.config_hash for c in cells}) == 8 and len({c.dir for c in cells}) == 12
    assert {c.config.feature_cache for c in cells} == {str(Path(s.study_dir) / ".feature-cache")}
    assert "launch/study.py" in (REPO / "configs" / "study_demo.yaml").read_text()


def test_a_cell_yaml_gives_the_eval_job_the_cells_hash_and_prepare_keeps_only_its_own_folder(tmp_path, encoders):
    from medssl_scale.finetune.config import load_eval_config
    from medssl_scale.study.cells import expand, init_digests, prepare
    from medssl_scale.study.config import load_study_config

    s = load_study_config(str(write_study(tmp_path / "s.yaml", tmp_path / "shards",
                                          inits={"random": None, "micle": str(encoders / "encoder.pt")},
                                          protocols=["finetune"])), [])
    cell = expand(s, init_digests(s))[3]
    path = prepare(cell)
    assert load_eval_config(str(path)).content_hash() == cell.config_hash  # what the job will record
    # A fine-tune killed midway in this cell's folder resumes: its checkpoint is kept.
    (cell.dir / "checkpoints").mkdir()
    (cell.dir / "checkpoints" / "last.pt").write_bytes(b"x")
    prepare(cell)
    assert (cell.dir / "checkpoints" / "last.pt").exists()
    # The same folder under another config (here: other bootstrap settings) is moved aside first, not deleted.
    other = expand(load_study_config(str(tmp_path / "s.yaml"), ["base.overrides.report.n_resamples=300"]),
                   init_digests(s))[3]
    assert other.dir == cell.dir and other.config_hash != cell.config_hash
    prepare(other)
    assert not (cell.dir / "checkpoints").exists() and (cell.dir / "cell.yaml").exists()
    assert (cell.dir.with_name(cell.dir.name + ".stale-1") / "checkpoints" / "last.pt").exists()


def test_a_result_on_other_shards_at_the_same_path_is_not_done(tmp_path, monitor_shards):
    import shutil

    from medssl_scale.study.cells import expand, init_digests, is_done, prepare
    from medssl_scale.study.config import load_study_config

    shards = tmp_path / "shards"
    shutil.copytree(monitor_shards, shards)
    s = load_study_config(str(write_study(tmp_path / "s.yaml", shards)), [])
    cell = expand(s, init_digests(s))[0]
    prepare(cell)
    _fake_result(cell, 0.7)
    assert is_done(cell)
    # Rebuilt at the same path (here: the manifest rewritten): the eval config and its hash are the same...
    manifest = shards / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tool_version"', '"rebuilt": true, "tool_version"'))
    again = expand(s, init_digests(s))[0]
    assert again.config_hash == cell.config_hash and again.data_sha256 != cell.data_sha256
    assert not is_done(again)  # ...but the result is of the old build: redone
    prepare(again)
    assert (cell.dir.with_name(cell.dir.name + ".stale-1") / "metrics.json").exists()  # and kept aside


def test_a_dry_run_and_aggregation_leave_the_submitted_cell_list_alone(monitor_shards, tmp_path):
    config = write_study(tmp_path / "s.yaml", monitor_shards)
    study_dir = tmp_path / "study"
    assert study("--config", config, "--dry-run").returncode == 0
    assert not (study_dir / "cells.json").exists() and not (study_dir / "study.yaml").exists()
    assert study("--config", config, "--aggregate-only", "fractions=[1.0]").returncode == 1  # nothing done yet
    assert not (study_dir / "cells.json").exists()


def test_nested_and_dotted_overrides_are_the_same_and_mappings_are_replaced(tmp_path):
    from medssl_scale.study.config import flatten_overrides

    assert flatten_overrides({"data": {"shards": "S", "workers": 0}, "task.mapping": {"a": None},
                              "task": {"column": "c"}}) == {"data.shards": "S", "data.workers": 0,
                                                            "task.mapping": {"a": None}, "task.column": "c"}


@pytest.mark.parametrize("overrides, needle", [
    (["fractions=[0.0]"], "fractions: 0.0 is not in (0, 1]"),
    (["fractions=[1.5]"], "fractions: 1.5 is not in (0, 1]"),
    (["fractions=[0.5,0.5]"], "fractions lists 0.5 more than once"),
    (["seeds=[]"], "seeds is empty: the study has no cells"),
    (["inits={}"], "inits is empty"),
    (["inits.micle=/nonexistent/encoder.pt"], "inits.micle: /nonexistent/encoder.pt not found"),
    (["inits.notes=ENC/notes.txt"], "inits.notes: encoder: "),
    (["inits.micle=ENC/encoder.pt", "base.overrides.model.depth=34"], "is a ResNet with depth=18"),
    (["inits.a/b=null"], "is not a usable name"),
    (["protocols=[linear,probe]"], "protocols: 'probe' is not one of"),
    (["baseline=imagenet"], "baseline='imagenet' is not one of the inits (random)"),
    (["base.overrides.label_fraction=0.1"], "the study sets label_fraction in each cell"),
    (["base.overrides.data.shard=x"], "did you mean 'data.shards'"),
    (["base.overrides.data.shards=/nonexistent/shards"], "no manifest.json"),
    (["base.overrides.task.column=nope"], "label column 'nope' is not in the shards"),
    (["metric=auc_mean"], "metric='auc_mean' is not a metric of this multiclass task"),
    (["fractons=[0.5]"], "did you mean 'fractions'"),
    (["slurm.time=24:00:00"], "quote it"),
    (["slurm.time=30"], "quote it"),
    (["slurm.time=bogus"], "is not a Slurm time"),
    (["workers=0"], "workers=0: must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_cell(monitor_shards, encoders, tmp_path, capsys, overrides,
                                                          needle):
    cfg = write_study(tmp_path / "s.yaml", monitor_shards)
    rc = launcher().main(["--config", str(cfg), *[o.replace("ENC", str(encoders)) for o in overrides]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("study: error:"), err
    assert needle in err, err
    assert not (tmp_path / "study").exists()  # nothing was made, no cell ran


def test_duplicate_init_names_are_refused(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"study_dir: {tmp_path / 'study'}\ninits:\n  micle: a.pt\n  random: null\n  micle: b.pt\n")
    assert launcher().main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"study: error: config file {cfg}: key 'micle' appears twice (line 5): each key, init names " \
                  "included, must be unique"


def test_a_second_local_runner_of_one_study_is_refused(monitor_shards, tmp_path, capsys):
    from medssl_scale.study.driver import _lock

    cfg = write_study(tmp_path / "s.yaml", monitor_shards)
    (tmp_path / "study").mkdir()
    with _lock(tmp_path / "study"):  # as a running launch/study.py holds it
        assert launcher().main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"study: error: another launch/study.py is running the cells of {tmp_path / 'study'}: let it " \
                  "finish (or stop it) first"
    assert not (tmp_path / "study" / "cells").exists()


def test_cells_sharing_features_wait_for_the_one_that_extracts_them(tmp_path):
    from medssl_scale.study.cells import expand
    from medssl_scale.study.config import load_study_config
    from medssl_scale.study.runner import plan
    from medssl_scale.study.slurm import array_spec

    (tmp_path / "e.pt").write_bytes(b"weights")
    s = load_study_config(str(write_study(tmp_path / "s.yaml", tmp_path / "shards", seeds=[0, 1],
                                          inits={"random": None, "micle": str(tmp_path / "e.pt")},
                                          protocols=["linear", "finetune"])), [])
    cells = expand(s, {"random": None, "micle": "d"})
    by = {c.name: c.index for c in cells}
    first, waits = plan(cells, [])
    # One leader per cache group (a random init's features differ per seed; an encoder file's do not), the
    # largest fraction; fine-tuning reads no cache and never waits.
    leaders = {"random/linear/f1.0/s0", "random/linear/f1.0/s1", "micle/linear/f1.0/s0"}
    assert {c.name for c in first} == leaders | {c.name for c in cells if c.protocol == "finetune"}
    assert waits == {by["random/linear/f0.5/s0"]: by["random/linear/f1.0/s0"],
                     by["random/linear/f0.5/s1"]: by["random/linear/f1.0/s1"],
                     by["micle/linear/f0.5/s0"]: by["micle/linear/f1.0/s0"],
                     by["micle/linear/f0.5/s1"]: by["micle/linear/f1.0/s0"],
                     by["micle/linear/f1.0/s1"]: by["micle/linear/f1.0/s0"]}
    # A group with a finished cell has its features cached already: nothing waits.
    done = [cells[by["micle/linear/f1.0/s0"]]]
    first, waits = plan([c for c in cells if c not in done], done)
    assert not any(cells[i].init == "micle" for i in waits)
    assert array_spec([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8" and array_spec([3]) == "3"


def test_the_accelerate_launcher_runs_the_eval_job_on_a_free_port():
    from medssl_scale.study.runner import FINETUNE, launcher_argv

    accelerate = {"kind": "accelerate", "num_processes": 2, "cpu": True, "args": ["--num_cpu_threads_per_process", "1"]}
    argv = launcher_argv(accelerate, "/s/cell.yaml", python="py")
    assert argv[:5] == ["py", "-m", "accelerate.commands.launch", "--cpu", "--num_processes"] and argv[5] == "2"
    assert argv[-3:] == [str(FINETUNE), "--config", "/s/cell.yaml"] and "--num_cpu_threads_per_process" in argv
    assert int(argv[argv.index("--main_process_port") + 1]) > 0
    assert launcher_argv({"kind": "python"}, "c.yaml", python="py") == ["py", str(FINETUNE), "--config", "c.yaml"]


# ---------------------------------------------------------------- aggregation on synthetic results

# balanced_accuracy of each (init, fraction) by seed; None: the cell has no result
VALUES = {"random": {0.1: [0.50, 0.54], 0.5: [0.60, 0.64], 1.0: [0.70, 0.74]},
          "micle": {0.1: [0.66, 0.70], 0.5: [0.72, 0.76], 1.0: [0.80, None]},
          "weak": {0.1: [0.60, None], 0.5: [0.60, 0.60], 1.0: [0.60, 0.60]}}


def _fake_result(cell, value, encoder_hash=None):
    block = {"balanced_accuracy": {"value": value, "low": value - 0.1, "high": value + 0.1, "n_defined": 200},
             "accuracy": {"value": value + 0.05, "low": value - 0.05, "high": value + 0.15, "n_defined": 200},
             "auc/PA": {"value": None, "low": None, "high": None, "n_defined": 0},
             "n_images": 35, "n_patients": 17, "auc_excluded": [], "bootstrap": {"n_resamples": 200}}
    cell.dir.mkdir(parents=True, exist_ok=True)
    (cell.dir / "metrics.json").write_text(json.dumps({
        "config_hash": cell.config_hash, "encoder_hash": encoder_hash or cell.encoder_sha256 or "random-recipe",
        "n_train_images": int(100 * cell.fraction), "n_train_patients": int(50 * cell.fraction), "n_val_images": 4,
        "n_test_images": 35, "n_test_patients": 17, "encoder": cell.encoder, "metrics": block}))
    for name in ("predictions.csv", "reliability.png"):
        (cell.dir / name).write_text("x")


def test_aggregation_and_headline_equal_hand_computed_values(tmp_path):
    from medssl_scale.study.cells import expand, identity, init_digests, is_done
    from medssl_scale.study.config import load_study_config
    from medssl_scale.study.driver import Plan, aggregate_and_report

    for name in ("micle", "weak"):
        (tmp_path / f"{name}.pt").write_bytes(name.encode())
    s = load_study_config(str(write_study(tmp_path / "s.yaml", tmp_path / "shards", seeds=[0, 1],
                                          fractions=[0.1, 0.5, 1.0],
                                          inits={"random": None, "micle": str(tmp_path / "micle.pt"),
                                                 "weak": str(tmp_path / "weak.pt")})), [])
    cells = expand(s, init_digests(s))
    for c in cells:
        v = VALUES[c.init][c.fraction][c.seed]
        if v is not None:
            _fake_result(c, v)
    # micle at 1.0, seed 1: a result of an older encoder.pt at the same path (stale, not done)
    stale = next(c for c in cells if c.name == "micle/linear/f1.0/s1")
    _fake_result(stale, 0.99, encoder_hash="0" * 64)
    # weak at 0.1, seed 1: failed with the eval job's one-line error
    failed = next(c for c in cells if c.name == "weak/linear/f0.1/s1")
    failed.dir.mkdir(parents=True)
    (failed.dir / "cell.json").write_text(json.dumps(identity(failed)))
    error = "finetune: error: label_fraction=0.1 keeps 1"
    (failed.dir / "status.json").write_text(json.dumps({"rc": 2, "error": error}))
    # a cell killed while writing its outputs (metrics.json, no reliability.png yet) is not done either
    killed = next(c for c in cells if c.name == "random/linear/f0.1/s1")
    assert is_done(killed)
    (killed.dir / "reliability.png").unlink()
    assert not is_done(killed)
    VALUES_NOW = {**VALUES, "random": {**VALUES["random"], 0.1: [0.50, None]}}

    lines = []
    assert aggregate_and_report(Plan(s, cells, "balanced_accuracy"), log=lines.append) == 1  # cells missing
    d = Path(s.study_dir)
    rows = read_csv(d / "label_efficiency.csv")
    assert len(rows) == 18
    assert [(r["init"], float(r["fraction"]), int(r["seed"])) for r in rows] == [
        (i, f, seed) for i in ("random", "micle", "weak") for f in (0.1, 0.5, 1.0) for seed in (0, 1)]
    for r in rows:
        v = VALUES_NOW[r["init"]][float(r["fraction"])][int(r["seed"])]
        if v is None:
            assert r["status"] in ("not run", "failed") and r["value"] == ""
            continue
        assert r["status"] == "done" and float(r["value"]) == v
        assert float(r["ci_low"]) == pytest.approx(v - 0.1) and float(r["ci_high"]) == pytest.approx(v + 0.1)
        assert float(r["accuracy"]) == pytest.approx(v + 0.05) and r["auc/PA"] == ""
        assert int(r["n_train_patients"]) == int(50 * float(r["fraction"]))
    assert next(r for r in rows if r["cell"] == "cells/weak/linear/f0.1/s1")["status"] == "failed"
    assert "label_fraction=0.1 keeps 1" in next(r for r in rows if r["status"] == "failed")["error"]

    h = {(x["init"]): x for x in json.loads((d / "headline.json").read_text())["headline"]}
    sd = math.sqrt(2 * 0.02 ** 2)  # sample std of two values 0.04 apart
    base = h["micle"]["baseline_at_1"]
    assert base["mean"] == pytest.approx(0.72) and base["std"] == pytest.approx(sd)
    assert base["ci_low"] == pytest.approx(0.62) and base["ci_high"] == pytest.approx(0.82)
    # micle: 0.68 at 10% < 0.72, 0.74 at 50% >= 0.72
    assert h["micle"]["fraction"] == 0.5 and h["micle"]["reached"]["mean"] == pytest.approx(0.74)
    assert h["micle"]["reached"]["std"] == pytest.approx(sd)
    assert h["random"]["fraction"] == 1.0  # the baseline reaches itself at 100% (0.52, 0.62 below 0.72)
    assert h["weak"]["fraction"] is None and h["weak"]["note"] == "not reached"
    assert h["weak"]["best"]["mean"] == pytest.approx(0.60)

    md = (d / "summary.md").read_text()
    assert "**micle** (linear): reaches random's balanced_accuracy at 100% of the labels (0.7200 ± 0.0283, " \
           "95% CI [0.6200, 0.8200]) with **50%** of the labels, 2x fewer labels: 0.7400 ± 0.0283" in md
    assert "**weak** (linear): does not reach" in md
    assert "**random** (linear) is the baseline: balanced_accuracy 0.7200 ± 0.0283 at 100% of the labels" in md
    assert "| 10% | 0.5000 (1 of 2 seeds) | 0.6800 ± 0.0283 | 0.6000 (1 of 2 seeds) |" in md
    assert "| 100% | 0.7200 ± 0.0283 | 0.8000 (1 of 2 seeds) | 0.6000 ± 0.0000 |" in md
    assert "## Missing cells (3)" in md and "cells/micle/linear/f1.0/s1" in md
    assert (d / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("aggregated 15 of 18 cells" in ln for ln in lines)
    assert any("missing cells/weak/linear/f0.1/s1: failed (exit 2: finetune: error:" in ln for ln in lines)


def test_a_lower_is_better_metric_reaches_from_below():
    from medssl_scale.study.aggregate import Point, headlines

    pts = [Point("knn", "random", 1.0, 2, 2, 0.10, 0.01, 0.05, 0.15),
           Point("knn", "micle", 0.2, 2, 2, 0.12, 0.01, None, None),
           Point("knn", "micle", 0.5, 2, 2, 0.09, 0.01, None, None)]
    (r, m) = headlines(pts, ["random", "micle"], ["knn"], "random", "ece")
    assert m.fraction == 0.5 and r.fraction == 1.0
    (_, m) = headlines(pts, ["random", "micle"], ["knn"], "random", "accuracy")
    assert m.fraction == 0.2
    (_, m) = headlines(pts[1:], ["random", "micle"], ["knn"], "random", "accuracy")
    assert m.fraction is None and "fraction 1.0" in m.note


# ---------------------------------------------------------------- a real study, run twice, then resumed

def test_a_study_runs_its_cells_once_and_resumes_what_is_missing(monitor_shards, encoders, tmp_path, capsys):
    cfg = write_study(tmp_path / "s.yaml", monitor_shards, workers=2,
                      inits={"random": None, "micle": str(encoders / "encoder.pt")})
    d = tmp_path / "study"
    first = study("--config", cfg)  # the real command line
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 cells in" in first.stdout and "0 done, 4 to run" in first.stdout
    cells = {c["name"]: Path(c["dir"]) for c in json.loads((d / "cells.json").read_text())["cells"]}
    rows = read_csv(d / "label_efficiency.csv")
    assert [r["status"] for r in rows] == ["done"] * 4
    for r in rows:
        m = json.loads((d / r["cell"] / "metrics.json").read_text())
        assert float(r["value"]) == m["metrics"]["balanced_accuracy"]["value"]
        assert float(r["ci_low"]) == m["metrics"]["balanced_accuracy"]["low"]
        assert int(r["n_train_patients"]) == m["n_train_patients"]
    full, half = (next(r for r in rows if r["init"] == "random" and float(r["fraction"]) == f) for f in (1.0, 0.5))
    assert int(half["n_train_patients"]) == int(0.5 * int(full["n_train_patients"]) + 0.5)  # drawn by patient
    for name in ("label_efficiency.png", "summary.md", "headline.json"):
        assert (d / name).stat().st_size > 0
    # The 50% cells ran after their 100% cell had cached the features (one extraction per encoder and seed).
    assert "from the cache" in (cells["micle/linear/f0.5/s0"] / "log.txt").read_text()
    assert "from the cache" in (cells["random/linear/f0.5/s0"] / "log.txt").read_text()
    stamps = {n: (p / "metrics.json").stat().st_mtime_ns for n, p in cells.items()}

    # The same command again (its main() in this process: no interpreter start-up) runs nothing.
    assert launcher().main(["--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "4 done, 0 to run" in out and "aggregated 4 of 4 cells" in out
    assert {n: (p / "metrics.json").stat().st_mtime_ns for n, p in cells.items()} == stamps
    assert all((p / "log.txt").read_text().count("== study:") == 1 for p in cells.values())

    # A cell that lost its result (killed before metrics.json) is redone; new fractions add cells, and a
    # fraction too small for the data fails in its own cell while the others run.
    (cells["micle/linear/f0.5/s0"] / "metrics.json").unlink()
    assert launcher().main(["--config", str(cfg), "--workers", "3", "fractions=[0.02,0.5,1.0]"]) == 1
    out = capsys.readouterr().out
    assert "6 cells in" in out and "3 done, 3 to run" in out
    for init in ("random", "micle"):
        assert f"{init}/linear/f0.02/s0 FAILED (exit 2): finetune: error: label_fraction=0.02 keeps" in out
    assert "2 cell(s) failed" in out
    assert (cells["micle/linear/f0.5/s0"] / "log.txt").read_text().count("== study:") == 2
    assert (cells["random/linear/f0.5/s0"] / "log.txt").read_text().count("== study:") == 1
    rows = read_csv(d / "label_efficiency.csv")
    assert [(r["init"], r["fraction"], r["status"]) for r in rows] == [
        (i, f, "failed" if f == "0.02" else "done") for i in ("random", "micle") for f in ("0.02", "0.5", "1.0")]
    assert "## Missing cells (2)" in (d / "summary.md").read_text()


def test_the_aggregation_job_keeps_the_accounting_arguments_but_not_the_gpu_requests():
    from medssl_scale.study.slurm import aggregation_args

    assert aggregation_args(["--account=rad", "--gres=gpu:1", "--qos=low", "--gpus-per-task=1", "--mem=32G"]) == \
        ["--account=rad", "--qos=low", "--mem=32G"]


def test_a_null_metric_is_reported_with_its_reason_and_a_signal_stop_is_named(tmp_path):
    from medssl_scale.study.aggregate import collect
    from medssl_scale.study.cells import expand, init_digests
    from medssl_scale.study.config import load_study_config
    from medssl_scale.study.runner import describe

    s = load_study_config(str(write_study(tmp_path / "s.yaml", tmp_path / "shards")), [])
    cell = expand(s, init_digests(s))[0]
    _fake_result(cell, 0.7)
    (row,) = collect([cell], "auc/PA", s.study_dir)  # written as null: one class absent from the test set
    assert row["status"] == "done" and row.get("value") is None and "auc/PA is null in metrics.json" in row["error"]
    assert describe({"rc": -10, "log": "L", "seconds": 1.0}).startswith("stopped by SIGUSR1")
