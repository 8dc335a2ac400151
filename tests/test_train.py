"""The DeepSpeed trainer through its real launchers (2 CPU processes, gloo): ZeRO 0-3, exact resume after
kill -9 (signals: test_train_signals.py), torchrun, encoder export, bad configurations."""

from __future__ import annotations

import math
import subprocess

import sys

import pytest
import torch

from medssl_scale.models import build_backbone
from shardtools import REPO
from trainrun import build_sample_shards, kill_group, losses, run, start, wait_for_step

pytestmark = pytest.mark.train
STEPS = ["train.steps=6", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_sample_shards(tmp_path_factory.mktemp("train") / "shards")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted LARS run (ZeRO 0) through the deepspeed launcher."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run("deepspeed", run_dir, shards, *STEPS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_run_writes_metrics_config_and_encoder(reference):
    records = losses(reference)
    assert [s for s, _ in records] == list(range(1, 7)) and all(math.isfinite(v) for _, v in records)
    assert "global_batch: 16" in (reference / "config.yaml").read_text()
    saved = torch.load(reference / "encoder.pt", weights_only=True)
    encoder = saved["state_dict"]
    assert all(v.dtype == torch.float32 for k, v in encoder.items() if v.is_floating_point())
    assert saved["arch"] == {"depth": 18, "width": 1, "small_input": False, "input_size": 32,
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "preset": "chest_xray",
                             "feature_dim": 512}
    backbone = build_backbone(18)
    backbone.load_state_dict(encoder, strict=True)
    # At width 1 without small_input, torchvision's ResNet of the same depth takes it (its fc stays random).
    import torchvision

    missing, unexpected = torchvision.models.resnet18().load_state_dict(encoder, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_kill9_and_rerun_resumes_with_identical_losses(reference, shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = start("deepspeed", run_dir, shards, *STEPS)
    wait_for_step(run_dir, 3, proc)  # past the checkpoint of step 2, before the one of step 4
    kill_group(proc)
    assert (run_dir / "checkpoints" / "complete.json").exists()
    proc = run("deepspeed", run_dir, shards, *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stdout + proc.stderr
    assert losses(run_dir) == losses(reference)


def test_torchrun_gives_the_same_run(reference, shards, tmp_path):
    proc = run("torchrun", tmp_path / "run", shards, *STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "run") == losses(reference)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage_0(shards, tmp_path_factory, stage):
    base = tmp_path_factory.getbasetemp() / "adamw-zero0"
    common = ["train.steps=3", "train.checkpoint_every=3", "optim.name=adamw", "optim.base_lr=0.001",
              "optim.warmup_steps=1"]
    if not (base / "encoder.pt").exists():
        proc = run("deepspeed", base, shards, *common, "train.zero_stage=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path_factory.mktemp(f"zero{stage}") / "run"
    proc = run("deepspeed", run_dir, shards, *common, f"train.zero_stage={stage}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, ref = losses(run_dir), losses(base)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(ours, ref)), (ours, ref)
    enc, ref_enc = (torch.load(d / "encoder.pt", weights_only=True)["state_dict"] for d in (run_dir, base))
    assert enc.keys() == ref_enc.keys()
    assert max((enc[k].float() - ref_enc[k].float()).abs().max().item() for k in enc) < 1e-3


@pytest.mark.parametrize("overrides,needle", [
    (["train.stepz=3"], "did you mean 'train.steps'"),
    (["train.steps=three"], "train.steps: expected an integer"),
    (["train.steps=3"], "optim.warmup_steps=5 exceeds train.steps=3"),
    (["train.global_batch=15", "train.grad_accum=2"], "not divisible"),
    (["optim.name=lars", "train.zero_stage=2"], "LARS trust ratios would be wrong"),
    (["data.shards=/nonexistent/shards"], "no manifest.json"),
    (["augment.view={flip: 0.5}"], "unknown key"),
])
def test_bad_configuration_is_one_clear_line(shards, tmp_path, overrides, needle):
    proc = run("python", tmp_path / "run", shards, *overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_lars_under_deepspeed_equals_plain_single_process_lars(shards, tmp_path):
    """What the trainer accepts with LARS (ZeRO 0, 2 ranks, global BN) must equal plain LARS in one process
    on the concatenated batch: the same losses and the same weights after 3 steps."""
    from medssl_scale.augment.policy import policy_from_config
    from medssl_scale.augment.torchvision_backend import TorchvisionAugmenter
    from medssl_scale.config import load_config
    from medssl_scale.data.reader import ShardPairSource
    from medssl_scale.data.shardset import ShardSet
    from medssl_scale.losses.ntxent import nt_xent
    from medssl_scale.optim import lr_at
    from medssl_scale.train.builders import build_model, build_optimizer, peak_lr
    from trainrun import FAST

    overrides = ["train.steps=3", "train.checkpoint_every=3", "optim.warmup_steps=1"]
    run_dir = tmp_path / "ds"
    proc = run("deepspeed", run_dir, shards, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = load_config("configs/debug_cpu.yaml", [f"data.shards={shards}", *FAST, *overrides])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "cpu")  # no process group: plain BatchNorm over the whole batch
    optimizer = build_optimizer(cfg, model)
    augment = TorchvisionAugmenter(policy_from_config(cfg.augment))
    shardset = ShardSet.open(str(shards), "train")
    micro = cfg.train.global_batch // 2
    ranks = [ShardPairSource(shardset, r, 2, micro, cfg.data.mode, cfg.seed).batches(0) for r in range(2)]
    expected = []
    for step in range(3):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, peak_lr(cfg), cfg.optim.warmup_steps, 3, cfg.optim.final_lr)
        parts = [augment(next(r)) for r in ranks]
        x = torch.cat([p["view1"] for p in parts] + [p["view2"] for p in parts])
        _, emb = model(x)
        z1, z2 = emb.float().chunk(2)
        out = nt_xent(z1, z2, cfg.loss.temperature, patient=torch.cat([p["patient"] for p in parts]),
                      valid=torch.cat([p["valid"] for p in parts]), exclude_same_patient=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        expected.append(float(out.global_loss))
    got = [v for _, v in losses(run_dir)]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    encoder = torch.load(run_dir / "encoder.pt", weights_only=True)["state_dict"]
    reference = model.encoder_state_dict()
    worst = max((encoder[k] - reference[k].float()).abs().max().item() for k in encoder if encoder[k].is_floating_point())
    assert worst < 1e-5, worst


def test_export_on_demand_from_an_earlier_checkpoint(reference, tmp_path):
    from medssl_scale.train.builders import build_model
    from medssl_scale.config import load_config

    tags = sorted(p.name for p in (reference / "checkpoints").glob("step*"))
    assert tags[-1] == "step00000006" and len(tags) == 2  # keep_checkpoints=2 pruned the oldest
    out = tmp_path / "enc4.pt"
    proc = subprocess.run([sys.executable, "launch/export_encoder.py", str(reference / "checkpoints"), str(out),
                           "--tag", tags[0]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    earlier, final = (torch.load(p, weights_only=True)["state_dict"] for p in (out, reference / "encoder.pt"))
    assert earlier.keys() == final.keys() and any(not torch.equal(earlier[k], final[k]) for k in final)
    # A later stage starts from it: the backbone weights are exactly the exported ones.
    cfg = load_config("configs/debug_cpu.yaml", [f"model.init_encoder={out}"])
    model = build_model(cfg, "cpu")
    assert all(torch.equal(v, earlier[k]) for k, v in model.backbone.state_dict().items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    # An absurd learning rate blows the weights up after the first update.
    proc = run("python", run_dir, shards, "train.steps=4", "train.checkpoint_every=1", "optim.name=sgd",
               "optim.base_lr=1.0e30", "optim.lr_scaling=none", "optim.warmup_steps=0", timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0]
    marker = (run_dir / "checkpoints" / "complete.json").read_text()
    good = [s for s, v in losses(run_dir) if math.isfinite(v)]
    assert good and f'"step": {good[-1]}' in marker  # the last checkpoint is the last finite step


@pytest.mark.s3
def test_checkpoints_on_s3_resume_exactly(s3_endpoint, shards, tmp_path):
    s3_endpoint.make_bucket("ckpt")
    common = ["train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=1", "optim.warmup_steps=1"]
    local = run("python", tmp_path / "local", shards, *common)
    assert local.returncode == 0, local.stderr[-2000:]
    remote_run = tmp_path / "remote"
    proc = start("python", remote_run, shards, *common, "train.checkpoint_dir=s3://ckpt/run1")
    wait_for_step(remote_run, 2, proc)
    kill_group(proc)
    import fsspec

    fs = fsspec.filesystem("s3")
    assert fs.exists("ckpt/run1/complete.json")
    proc = run("python", remote_run, shards, *common, "train.checkpoint_dir=s3://ckpt/run1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step" in proc.stdout + proc.stderr
    assert losses(remote_run) == losses(tmp_path / "local")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpt/run1")) == ["complete.json", "step00000004"]
    assert torch.load(remote_run / "encoder.pt", weights_only=True)["state_dict"].keys() == \
        torch.load(tmp_path / "local" / "encoder.pt", weights_only=True)["state_dict"].keys()
