"""The kNN monitor and collapse statistics of pretraining (train/monitor.py, train/collapse.py, the trainer).

Its scores against a direct numpy / scikit-learn computation; its features in 2 processes against one
process and against one-image forwards; a monitored 2-rank deepspeed run against the unmonitored
reference (identical losses), its records, TensorBoard events and an exact resume after SIGTERM.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess

import numpy as np
import pytest
import torch
from shardtools import REPO
from trainrun import (ADAMW, FAST, MONITOR, REFERENCE, VENV_BIN, env, free_port, losses, run, signal_group, start_logged,
                      wait_for_step)

KNN_KEYS = ("knn_top1", "knn_bal_acc", "knn_auc")
COLLAPSE = ("embed_std", "align", "uniform", "pos_cos", "neg_cos")
TIMING = ("pairs_per_s", "monitor_s", "monitor_share")
SMALL = [o for o in FAST if o.startswith(("augment.", "model."))] + ["monitor.workers=1", "monitor.batch_size=16"]


def _monitor(shards, *overrides):
    """The trainer's monitor, in this process, on the debug config's model at its seed."""
    from medssl_scale.augment.policy import policy_from_config
    from medssl_scale.config import load_config
    from medssl_scale.train.builders import build_model
    from medssl_scale.train.monitor import open_monitor

    cfg = load_config(str(REPO / "configs/debug_cpu.yaml"), [f"monitor.shards={shards}", *SMALL, *overrides])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "cpu")
    return open_monitor(cfg, policy_from_config(cfg.augment), torch.device("cpu")), model


# ---------------------------------------------------------------- scores

def _numpy_knn(xb, yb, xq, k, t, n_classes):
    """DINO's weighted cosine kNN, written out in float64 (votes divided by their total)."""
    b = xb / np.linalg.norm(xb, axis=1, keepdims=True)
    q = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    sims = q @ b.T
    probs = np.zeros((len(xq), n_classes))
    for i, row in enumerate(sims):
        top = np.argsort(-row, kind="stable")[:k]
        for j in top:
            probs[i, yb[j]] += np.exp(row[j] / t)
        probs[i] /= probs[i].sum()
    return probs


def test_knn_and_linear_scores_equal_direct_computations(monitor_shards, one_thread):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    monitor, _ = _monitor(monitor_shards, "monitor.task.column=finding", "monitor.task.mapping={}",
                          "monitor.linear=true", "monitor.k=7", "monitor.temperature=0.1")
    assert monitor.spec.names == ["ARDS", "COVID-19", "No Finding", "Pneumocystis"]
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 2
    yb, yq = np.arange(60) % 4, np.arange(40) % 4
    xb = (centers[yb] + rng.normal(size=(60, 16))).astype(np.float32)
    xq = (centers[yq] + rng.normal(size=(40, 16))).astype(np.float32)
    got = monitor.score(xb, yb, xq, yq)
    probs = _numpy_knn(xb.astype(np.float64), yb, xq.astype(np.float64), 7, 0.1, 4)
    assert got["knn_top1"] == pytest.approx(np.mean(probs.argmax(1) == yq), abs=1e-12)
    assert got["knn_bal_acc"] == pytest.approx(balanced_accuracy_score(yq, probs.argmax(1)), abs=1e-12)
    assert got["knn_auc"] == pytest.approx(roc_auc_score(yq, probs, multi_class="ovr"), abs=1e-6)
    # The probe: L2 l2 on the mean loss is scikit-learn's C = 1 / (l2 N), on standardized features.
    mean, std = xb.mean(0), xb.std(0)
    ref = LogisticRegression(C=1 / (1e-4 * len(xb)), tol=1e-10, max_iter=10000).fit((xb - mean) / std, yb)
    ref_probs = ref.predict_proba((xq - mean) / std)
    assert got["linear_top1"] == pytest.approx(np.mean(ref_probs.argmax(1) == yq), abs=1e-12)
    assert got["linear_auc"] == pytest.approx(roc_auc_score(yq, ref_probs, multi_class="ovr"), abs=2e-3)


def test_an_undefined_auc_is_null_not_nan(monitor_shards, one_thread):
    monitor, _ = _monitor(monitor_shards)
    x = np.eye(4, dtype=np.float32)
    got = monitor.score(x, np.array([0, 1, 0, 1]), x[[0, 2]], np.array([0, 0]))  # one class scored: no AUC
    assert got["knn_auc"] is None and got["knn_top1"] == 1.0
    json.dumps(got, allow_nan=False)


# ---------------------------------------------------------------- features

def test_each_monitor_feature_is_its_own_image_forward(monitor_shards, one_thread):
    from medssl_scale.finetune.images import LabelledImages

    monitor, model = _monitor(monitor_shards)
    bank, query = monitor.embed(model)
    assert bank.present.all() and query.present.all()
    splits = json.loads((monitor_shards / "manifest.json").read_text())["splits"]
    assert len(bank.values) == splits["train"]["images"] and len(query.values) == splits["val"]["images"]
    model.eval()
    for split, out in ((monitor.bank, bank), (monitor.query, query)):
        images = LabelledImages(split.shardset, split.records, np.arange(len(split.records)), monitor.pre)
        for i in (0, len(split.records) // 2, len(split.records) - 1):
            x, pos, valid = images[i]
            with torch.no_grad():
                alone = model(x[None])[0][0].numpy()
            np.testing.assert_allclose(out.values[pos], alone, rtol=1e-4, atol=1e-5)


def test_the_image_cap_is_a_fixed_draw(monitor_shards):
    a, _ = _monitor(monitor_shards, "monitor.max_images=10")
    b, _ = _monitor(monitor_shards, "monitor.max_images=10")
    ids = [r.sample_id for r in a.bank.records]
    assert len(ids) == 10 and ids == [r.sample_id for r in b.bank.records] and len(set(ids)) == 10
    assert a.bank.available > 10 and len(a.query.records) == 10


def _worker(n: int, out, shards):
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(free_port()),
           "tests/monitor_worker.py", str(out), str(shards), *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def one_and_two_ranks(tmp_path_factory, monitor_shards):
    tmp = tmp_path_factory.mktemp("monitor-ranks")
    return _worker(1, tmp / "one.npz", monitor_shards), _worker(2, tmp / "two.npz", monitor_shards)


def test_two_ranks_gather_each_image_once_as_one_process_embeds_it(one_and_two_ranks):
    # The worker itself asserts on every rank that the model's mode, state and the global RNG are unchanged.
    one, two = one_and_two_ranks
    for split in ("bank", "query"):
        assert one[f"{split}_present"].all() and two[f"{split}_present"].all()
        np.testing.assert_allclose(two[split], one[split], rtol=1e-5, atol=1e-6)
    assert list(two["bank_ids"]) == list(one["bank_ids"])
    for key in KNN_KEYS:
        assert float(two[key]) == pytest.approx(float(one[key]), abs=1e-12)


# ---------------------------------------------------------------- in the trainer

@pytest.fixture(scope="module")
def monitored(pretrain_run, monitor_shards):
    """The reference run again, monitored every 3 steps, with TensorBoard events."""
    return pretrain_run("deepspeed", *REFERENCE, *MONITOR, f"monitor.shards={monitor_shards}",
                        "train.tensorboard=true")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_the_monitor_leaves_the_training_trajectory_unchanged(monitored, reference):
    assert losses(monitored) == losses(reference)  # bit for bit: the monitor reads the model, never moves it


def test_knn_at_step_0_every_3_steps_and_the_end_with_collapse_stats_each_logged_step(monitored, one_and_two_ranks):
    records = _records(monitored)
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 3, 6, 8]
    assert set(records[0]) == {"step", *KNN_KEYS, "monitor_s", "monitor_share"}  # step 0: before training
    # The 2-rank trainer's random init is the worker's: the same step-0 measurement.
    for key in KNN_KEYS:
        assert records[0][key] == pytest.approx(float(one_and_two_ranks[0][key]), abs=1e-12)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        # Unit vectors: sum_d var_d <= 1, so the mean std over D dimensions is at most 1/sqrt(D) (D = 32).
        assert 0 < r["embed_std"] <= 1 / math.sqrt(32) + 1e-9
        assert 0 <= r["align"] <= 4 and r["uniform"] <= 0 and -1 <= r["neg_cos"] <= r["pos_cos"] + 1
    for r in records:
        if "monitor_s" in r:
            assert r["monitor_s"] > 0 and 0 < r["monitor_share"] <= 1
            assert all(0 <= r[k] <= 1 for k in KNN_KEYS)


def test_under_zero_3_the_monitor_sees_the_whole_model_and_leaves_training_alone(pretrain_run, monitored,
                                                                               monitor_shards):
    """ZeRO-3 partitions every parameter over the ranks: the monitor's forward must gather them (it calls the
    whole model, whose hooks do) and must not disturb the partitioned optimizer's trajectory."""
    plain = pretrain_run("deepspeed", *ADAMW, "train.zero_stage=3")  # shared with test_train.py's ZeRO tests
    run_dir = pretrain_run("deepspeed", *ADAMW, "train.zero_stage=3", *MONITOR, f"monitor.shards={monitor_shards}")
    assert losses(run_dir) == losses(plain)
    records = _records(run_dir)
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 3]
    for key in KNN_KEYS:  # the same random init as the ZeRO-0 run: the same step-0 measurement
        assert records[0][key] == pytest.approx(_records(monitored)[0][key], abs=1e-12)


def test_tensorboard_events_hold_the_scalars_of_metrics_jsonl(monitored):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(monitored / "tensorboard"))
    events.Reload()
    records = _records(monitored)
    for key in ("loss", "lr", "embed_std", "uniform", "knn_top1", "knn_auc", "monitor_s"):
        want = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert all(abs(g - w) <= 1e-6 * max(1.0, abs(w)) for (_, g), (_, w) in zip(got, want)), key


def test_a_monitored_run_resumes_exactly_after_sigterm(monitored, monitor_shards, sample_shards, tmp_path):
    args = (*REFERENCE, *MONITOR, f"monitor.shards={monitor_shards}")
    run_dir = tmp_path / "run"
    proc = start_logged("deepspeed", run_dir, sample_shards, *args, log=tmp_path / "first.log")
    wait_for_step(run_dir, 4, proc)
    signal_group(proc, signal.SIGTERM)
    first = _records(run_dir)
    assert 4 <= first[-1]["step"] < 8, (tmp_path / "first.log").read_text()[-3000:]
    rerun = run("deepspeed", run_dir, sample_shards, *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    strip = (lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs])
    assert strip(_records(run_dir)) == strip(_records(monitored))  # losses, kNN and collapse statistics


# ---------------------------------------------------------------- collapse warning and bad input

def test_a_constant_encoder_is_flagged_as_collapsed():
    from medssl_scale.train.collapse import SpreadWatch, collapse_stats

    z = torch.ones(16, 32)
    stats = collapse_stats(z, z)
    assert stats["embed_std"] == 0 and stats["align"] == 0 and stats["uniform"] == pytest.approx(0, abs=1e-12)
    watch = SpreadWatch(0.2, 32)
    assert "collapsing" in watch.check(5, stats["embed_std"])
    assert watch.check(6, 0.0) is None                          # said once while it stays collapsed
    assert watch.check(7, collapse_stats(torch.randn(64, 32), torch.randn(64, 32))["embed_std"]) is None
    assert "collapsing" in watch.check(8, 0.001)                # and again after a recovery
    assert SpreadWatch(0.0, 32).check(9, 0.0) is None           # train.collapse_warning=0: never


@pytest.mark.parametrize("overrides,needle", [
    (["monitor.shards=/nonexistent/labelled"], "no manifest.json"),
    (["monitor.task.column=sex"], "label column 'sex' is not in the shards"),
    (["monitor.eval_split=train"], "monitor.train_split and monitor.eval_split both name 'train'"),
    (["monitor.eval_split=test"], "monitor.eval_split=test"),
    (["monitor.max_images=1"], "monitor.max_images=1: must be at least 2"),
])
def test_bad_monitor_configuration_is_one_clear_line(sample_shards, monitor_shards, tmp_path, overrides, needle):
    proc = run("python", tmp_path / "run", sample_shards, f"monitor.shards={monitor_shards}", *overrides,
               timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
