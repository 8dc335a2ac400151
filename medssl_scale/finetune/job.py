"""One evaluation run: sets, encoder, protocol, then metrics.json, predictions.csv, plots and model.pt.

Selection (L2 strength, k and temperature, the fine-tune epoch) uses the validation images only; the
test split is scored once, at the end, by the chosen model. Work is split across the processes of an
`accelerate launch`; fitting the probe or kNN and writing the outputs happen on the main process.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..train.rundir import check_run_dir
from .classifier import Classifier, SavedModel, load_model, save_model
from .config import EvalConfig, dump_eval_config
from .encoder import load_encoder_for_eval
from .features import cache_key, cached_features, run_over_split
from .heads import FITS
from .splits import ImageSet, JobSets, build_sets


def make_accelerator(cfg: EvalConfig):
    from accelerate import Accelerator
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.finetune.precision]
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)


def _cache_dir(cfg: EvalConfig) -> str:
    return cfg.feature_cache or str(Path(cfg.run_dir).resolve().parent / ".feature-cache")


def _rows(out, s: ImageSet, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the set's images that decoded (the others are reported, not guessed)."""
    ok = out.present[s.index]
    if not ok.all():
        print(f"finetune: {int((~ok).sum())} {what} image(s) could not be decoded and are left out")
    return out.values[s.index][ok], ok


def _meta(cfg: EvalConfig, sets: JobSets, enc_hash: str, extra: dict) -> dict:
    train = sets.train.counts() if sets.train is not None else {}
    return {"protocol": cfg.protocol, "task": sets.spec.task, "names": sets.spec.names,
            "label_fraction": cfg.label_fraction if cfg.label_fraction is not None
            else (None if cfg.labels_per_class else 1.0),
            "labels_per_class": cfg.labels_per_class, "seed": cfg.seed,
            **train, **(sets.val.counts() if sets.val is not None else {}), **sets.test.counts(),
            "encoder": cfg.encoder, "encoder_hash": enc_hash, "config_hash": cfg.content_hash(),
            "shards": cfg.data.shards, "labels": sets.spec.as_dict(), **sets.fraction, **extra}


def _write_outputs(run_dir: Path, cfg: EvalConfig, sets: JobSets, scores: np.ndarray, ok: np.ndarray,
                   meta: dict) -> dict:
    from . import outputs
    t = sets.test
    idx, labels = t.index[ok], t.labels[ok]
    recs = [t.records[i] for i in idx]
    spec = sets.spec
    block = outputs.evaluate_predictions(spec.task, labels, scores, [r.patient_id for r in recs], names=spec.names,
                                         n_resamples=cfg.report.n_resamples, seed=cfg.report.seed)
    result = outputs.write_metrics_json(run_dir / "metrics.json", block, meta)
    outputs.write_predictions_csv(run_dir / "predictions.csv", task=spec.task, names=spec.names,
                                  sample_ids=[r.sample_id for r in recs], patient_ids=[r.patient_id for r in recs],
                                  sources=[r.source for r in recs], labels=labels, scores=scores)
    if spec.task == "multiclass":
        outputs.plot_confusion_matrix(run_dir / "confusion_matrix.png", labels, scores, spec.names)
    outputs.plot_reliability(run_dir / "reliability.png", spec.task, labels, scores)
    outputs.print_summary(block, f"{cfg.protocol} on {Path(cfg.data.shards).name}:{cfg.data.test_split}")
    return result


def prepare(cfg: EvalConfig, test_only: bool = False, classes: list[str] | None = None):
    """Every check that needs no model run: run folder, splits, labels, fraction; the user's errors first."""
    check_run_dir(cfg.run_dir)
    return build_sets(cfg, classes=classes, test_only=test_only)


def run(cfg: EvalConfig, log=print) -> dict:
    """Train/select on train + val, score test once; write the run folder. Returns metrics.json's dict."""
    started = time.time()
    sets = prepare(cfg)
    enc = load_encoder_for_eval(cfg)
    acc = make_accelerator(cfg)
    run_dir = Path(cfg.run_dir)
    if acc.is_main_process:
        (run_dir / "config.yaml").write_text(dump_eval_config(cfg))
        log(f"train {sets.train.counts()}  val {sets.val.counts()}  test {sets.test.counts()}"
            + (f"  fraction: {sets.fraction['fraction']['n_patients']} patients" if "fraction" in sets.fraction else ""))
    names, task = sets.spec.names, sets.spec.task
    extra: dict = {"preprocess": enc.preprocess.as_dict(), "arch": enc.arch, "encoder_source": enc.source}
    if cfg.protocol in FITS:
        enc.backbone.to(acc.device)
        feats = {}
        for s in (sets.train, sets.val, sets.test):
            if s.shardset.split not in feats:
                key = cache_key(enc.hash, s.shardset, enc.preprocess, enc.arch, cfg.finetune.precision)
                feats[s.shardset.split] = cached_features(acc, enc.backbone, s.shardset, s.records, enc.preprocess,
                                                          key, _cache_dir(cfg), cfg.data.batch_size,
                                                          cfg.data.workers, cfg.data.on_corrupt, log=log)
        extract_s = time.time() - started
        result = None
        if acc.is_main_process:
            t0 = time.time()
            xtr, oktr = _rows(feats[sets.train.shardset.split], sets.train, "train")
            xva, okva = _rows(feats[sets.val.shardset.split], sets.val, "val")
            xte, okte = _rows(feats[sets.test.shardset.split], sets.test, "test")
            head = FITS[cfg.protocol](cfg, task, names, xtr, sets.train.labels[oktr], xva, sets.val.labels[okva], xte)
            if head.selection.get("l2_at_grid_edge"):
                log(f"note: the chosen L2 strength {head.selection['l2']:g} is the "
                    f"{head.selection['l2_at_grid_edge']} of linear.l2_grid; a wider grid may do better")
            extra.update(selection=head.selection, extract_s=round(extract_s, 2), fit_s=round(time.time() - t0, 3))
            save_model(str(run_dir / "model.pt"), protocol=cfg.protocol, task=task, names=names, arch=enc.arch,
                       pre=enc.preprocess, encoder_hash=enc.hash, backbone=enc.backbone.state_dict(), head=head.head)
            result = _write_outputs(run_dir, cfg, sets, head.test_scores, okte, _meta(cfg, sets, enc.hash, extra))
        acc.wait_for_everyone()
        return result or {}
    return _run_finetune(cfg, acc, sets, enc, run_dir, extra, log)


def _run_finetune(cfg, acc, sets, enc, run_dir, extra, log) -> dict:
    from .train_loop import FineTuner
    task, names = sets.spec.task, sets.spec.names
    model = Classifier(enc.backbone, len(names))
    tuner = FineTuner(cfg, acc, model, sets.train, sets.val, task, names, enc.preprocess, run_dir,
                      cfg.content_hash(), log=log if acc.is_main_process else (lambda *_: None))
    tuner.resume()
    extra["finetune"] = tuner.fit()
    scores_all, ok = tuner.evaluate(sets.test)
    module = acc.unwrap_model(tuner.model)
    result = None
    if acc.is_main_process:
        save_model(str(run_dir / "model.pt"), protocol="finetune", task=task, names=names, arch=enc.arch,
                   pre=enc.preprocess, encoder_hash=enc.hash, backbone=module.backbone.state_dict(),
                   head={"weight": module.head.weight.detach().cpu(), "bias": module.head.bias.detach().cpu()})
        result = _write_outputs(run_dir, cfg, sets, scores_all[ok], ok, _meta(cfg, sets, enc.hash, extra))
    acc.wait_for_everyone()
    return result or {}


def evaluate_saved(cfg: EvalConfig, classifier: str, log=print) -> dict:
    """Apply a saved model.pt to cfg's test split (e.g. out-of-distribution shards), no training."""
    obj = load_model(classifier)
    if cfg.task.type != obj["task"]:
        raise ConfigError(f"classifier={classifier} is a {obj['task']} model; set task.type={obj['task']}")
    sets = prepare(cfg, test_only=True, classes=obj["names"])
    model = SavedModel(obj)
    acc = make_accelerator(cfg)
    model.to(acc.device).eval()
    out = run_over_split(acc, model, sets.test.shardset, sets.test.records, model.preprocess, cfg.data.batch_size,
                         cfg.data.workers, cfg.data.on_corrupt)
    result = None
    if acc.is_main_process:
        run_dir = Path(cfg.run_dir)
        (run_dir / "config.yaml").write_text(dump_eval_config(cfg))
        scores, ok = _rows(out, sets.test, "test")
        extra = {"protocol": f"evaluate:{obj['protocol']}", "classifier": classifier, "label_fraction": None,
                 "labels_per_class": None, "encoder": None,
                 "preprocess": obj["preprocess"], "arch": obj["arch"]}
        meta = {**_meta(cfg, sets, obj["encoder_hash"], {}), **extra}
        result = _write_outputs(run_dir, cfg, sets, scores, ok, meta)
    acc.wait_for_everyone()
    return result or {}

