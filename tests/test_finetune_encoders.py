"""encoder.pt files written by the trainer (ZeRO-0 and ZeRO-3 through the deepspeed launcher) load into the
evaluation job with their recorded architecture and preprocessing, and probe (shipped sample, PA vs AP view)."""

from __future__ import annotations

import json

import pytest
import torch

from shardtools import REPO, run_cli
from trainrun import ADAMW, REFERENCE

from medssl_scale.finetune.config import load_eval_config
from medssl_scale.finetune.job import run


@pytest.fixture(scope="module")
def view_shards(tmp_path_factory):
    """The shipped sample with its `view` column as a label, split by patient."""
    sample = REPO / "data" / "sample_cxr"
    out = tmp_path_factory.mktemp("views") / "shards"
    run_cli("build", sample, out, "--manifest", sample / "metadata.csv", "--patient-col", "patient_id",
            "--label-cols", "view", "--splits", "train=0.5,val=0.25,test=0.25", "--max-side", "64", "--quiet")
    return out


@pytest.mark.parametrize("overrides", [REFERENCE, [*ADAMW, "train.zero_stage=3"]], ids=["zero0", "zero3"])
def test_a_trainer_encoder_loads_with_its_architecture_and_probes(overrides, pretrain_run, view_shards, tmp_path,
                                                                  one_thread):
    run_dir = pretrain_run("deepspeed", *overrides)  # the same runs test_train.py makes, shared per session
    saved = torch.load(run_dir / "encoder.pt", weights_only=True)
    out = tmp_path / "probe"
    cfg = load_eval_config(str(REPO / "configs/ham_linear.yaml"), [
        f"encoder={run_dir / 'encoder.pt'}", f"data.shards={view_shards}", f"run_dir={out}", "task.column=view",
        "task.mapping={AP Supine: AP}", "data.workers=0", "report.n_resamples=50", "linear.l2_grid=[0.01, 0.1, 1.0]"])
    result = run(cfg, log=lambda *_: None)
    m = json.loads((out / "metrics.json").read_text())
    assert result == m and m["names"] == ["AP", "PA"] and m["encoder_source"] == "encoder.pt"
    arch = saved["arch"]
    assert {k: m["arch"][k] for k in ("depth", "width", "small_input")} == {
        k: arch[k] for k in ("depth", "width", "small_input")}
    # The pretraining run's input size and normalization, not this config's defaults.
    assert m["preprocess"]["size"] == arch["input_size"] == 32
    assert m["preprocess"]["mean"] == pytest.approx(arch["mean"]) and m["preprocess"]["std"] == pytest.approx(arch["std"])
    model = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(model["backbone"][k], v) for k, v in saved["state_dict"].items())  # frozen, as saved
    assert m["n_test_images"] > 0 and 0.0 <= m["metrics"]["accuracy"]["value"] <= 1.0


def test_a_torchvision_state_dict_loads_without_its_classifier(view_shards, tmp_path, one_thread):
    import torchvision

    path = tmp_path / "resnet18-weights.pt"  # e.g. ImageNet weights a user downloaded; nothing is fetched
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, path)
    out = tmp_path / "probe"
    cfg = load_eval_config(str(REPO / "configs/ham_linear.yaml"), [
        f"encoder={path}", "model.depth=18", "preprocess.size=32", f"data.shards={view_shards}", f"run_dir={out}",
        "task.column=view", "task.mapping={AP Supine: AP}", "data.workers=0", "report.n_resamples=50",
        "linear.l2_grid=[0.1]"])
    m = run(cfg, log=lambda *_: None)
    assert m["encoder_source"] == "state_dict" and m["preprocess"]["size"] == 32
    backbone = torch.load(out / "model.pt", weights_only=True)["backbone"]
    assert set(backbone) == {k for k in tv if not k.startswith("fc.")}
    assert all(torch.equal(backbone[k], tv[k]) for k in backbone)
