"""Every shipped config loads strictly and passes the trainer's up-front checks at its intended size."""

from pathlib import Path

import pytest

from medssl_scale.augment.policy import policy_from_config
from medssl_scale.config import load_config
from medssl_scale.train.plan import batch_plan, check_combination, deepspeed_config
from shardtools import REPO

import yaml

ALL = sorted((REPO / "configs").glob("*.yaml"))
# Evaluation configs (launch/finetune.py) name a protocol; the others are pretraining runs.
EVAL = [p for p in ALL if "protocol" in (yaml.safe_load(p.read_text()) or {})]
# Study configs (launch/study.py) are loaded and checked by test_study.py.
STUDY = [p for p in ALL if "study_dir" in (yaml.safe_load(p.read_text()) or {})]
CONFIGS = [p for p in ALL if p not in EVAL and p not in STUDY]


@pytest.mark.parametrize("path", EVAL, ids=[p.stem for p in EVAL])
def test_evaluation_config_is_valid(path: Path):
    from medssl_scale.finetune.config import load_eval_config
    from medssl_scale.finetune.train_loop import finetune_view

    cfg = load_eval_config(str(path))
    finetune_view(cfg)  # the fine-tune augmentation keys are checked too
    assert cfg.protocol in ("linear", "knn", "finetune")
    assert "launch/finetune.py" in path.read_text()  # each says the command that runs it


def test_there_are_evaluation_configs():
    assert {p.stem for p in EVAL} >= {"ham_linear", "ham_finetune", "cxr_multilabel"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path: Path):
    cfg = load_config(str(path))
    check_combination(cfg)
    policy_from_config(cfg.augment)
    world = 2 if "debug" in path.stem else 8
    plan = batch_plan(cfg, world)
    ds = deepspeed_config(cfg, plan)
    assert ds["train_batch_size"] == plan.micro_batch * plan.grad_accum * world == cfg.train.global_batch


def test_imagenet_batch_arithmetic_matches_its_comments():
    cfg = load_config(str(REPO / "configs" / "imagenet_simclr.yaml"))
    assert cfg.train.global_batch == 4096 and batch_plan(cfg, 64).micro_batch == 64
    assert cfg.optim.base_lr * cfg.train.global_batch / 256 == pytest.approx(4.8)
