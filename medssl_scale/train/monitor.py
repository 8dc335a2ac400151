"""A learning signal during pretraining: the current encoder's kNN (and linear probe) on labelled shards.

A contrastive loss alone says little about a long run (MICLe's stays near ln(2N) for a long time, and
a collapsed encoder can still lower it). At step 0 (the random-init value to beat), every
`monitor.every` steps and at the end, the backbone in eval mode (running BN statistics used, never
updated; no gradient) embeds a fixed, seeded draw of at most `monitor.max_images` images of each of two
labelled splits, split across ranks, each image gathered exactly once (the evaluation job's
run_over_split). Rank 0 then scores the eval split against the train split with the evaluation job's
cosine kNN and metrics (and, with `monitor.linear`, its L-BFGS probe at one fixed L2 strength).

Memory is bounded by the cap (two (max_images, F) float32 arrays while measuring; nothing is kept
between measurements), not by the run's length. The global RNGs are left as they were, so a run with
the monitor trains exactly as one without it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, RunConfig, check_preprocess
from ..distributed.batchnorm import set_batch_mask
from ..distributed.ranks import RankGroup
from ..evaluate.knn import knn_scores
from ..evaluate.metrics import metric_arrays
from ..evaluate.probe import fit_logistic
from ..finetune.features import run_over_split
from ..finetune.images import ImageRecord, Preprocess
from ..finetune.labels import LabelSpec, label_spec
from ..finetune.splits import labelled_set, manifest_labels, open_split

log = logging.getLogger("medssl.train")
MAX_SHARE = 0.05  # of the run's time: above it the monitor says how to make itself cheaper


def check_monitor_config(cfg: RunConfig) -> None:
    """The monitor keys that can be checked without data; one line per mistake."""
    m = cfg.monitor
    if m.shards is None:
        return
    if not str(m.shards).strip():
        raise ConfigError("monitor.shards is empty: name a labelled medssl-shard build, or null for no monitor")
    if m.train_split == m.eval_split:
        raise ConfigError(f"monitor.train_split and monitor.eval_split both name {m.train_split!r}: the kNN bank "
                          f"and the scored images must be different splits")
    for key, low in (("every", 0), ("max_images", 2), ("batch_size", 1), ("workers", 0), ("k", 1)):
        if getattr(m, key) < low:
            raise ConfigError(f"monitor.{key}={getattr(m, key)}: must be at least {low}")
    if m.temperature <= 0 or m.linear_l2 <= 0:
        raise ConfigError("monitor.temperature and monitor.linear_l2 must be positive")
    check_preprocess(m.preprocess, "monitor.", "augment.size")


@dataclass
class MonitorSplit:
    """The capped, labelled images of one split: `records[i]` has target `labels[i]`."""

    name: str
    shardset: object
    records: list[ImageRecord]
    labels: np.ndarray
    available: int               # labelled images in the split before the cap


def _capped(role: str, url: str, split: str, spec: LabelSpec, cap: int, seed: int) -> MonitorSplit:
    shardset = open_split(url, split, f"monitor.{role}_split")
    s = labelled_set(role, shardset, spec)
    keep = np.arange(s.index.size)
    if keep.size > cap:  # a fixed draw: the same images at every measurement, on every rank, in every rerun
        keep = np.sort(np.random.default_rng([seed, 0 if role == "train" else 1]).choice(keep.size, cap, replace=False))
    return MonitorSplit(split, shardset, [s.records[i] for i in s.index[keep]], s.labels[keep], int(s.index.size))


class KnnMonitor:
    """measure(module, step) -> the metrics.jsonl keys of one measurement (on rank 0; {} elsewhere)."""

    def __init__(self, cfg: RunConfig, policy, device: torch.device, autocast):
        m = self.m = cfg.monitor
        self.cfg = cfg
        try:
            self.spec = label_spec(m.task, manifest_labels(m.shards), m.shards)
        except ConfigError as e:
            raise ConfigError(f"monitor: {e}") from None
        self.bank = _capped("train", m.shards, m.train_split, self.spec, m.max_images, cfg.seed)
        self.query = _capped("eval", m.shards, m.eval_split, self.spec, m.max_images, cfg.seed)
        p = m.preprocess
        self.pre = Preprocess(int(p.size or policy.size), float(p.crop_fraction), tuple(p.mean or policy.mean),
                              tuple(p.std or policy.std))
        self.group = RankGroup(device, autocast)
        self.total_s = 0.0

    def describe(self) -> str:
        return (f"monitor: kNN (k={self.m.k}) of {len(self.query.records)} {self.query.name} images against "
                f"{len(self.bank.records)} {self.bank.name} images of {self.m.shards}, "
                f"{self.spec.task} on {', '.join(self.spec.columns)} ({len(self.spec.names)} outputs), "
                f"at step 0, every {self.m.every or 'no'} steps and at the end")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.m.every > 0 and step % self.m.every == 0)

    @torch.no_grad()
    def embed(self, module: torch.nn.Module):
        """SplitOutputs of the bank and query images under `module` (a SimCLRModel: features, embeddings),
        in eval mode, each image once, on every rank; the module's mode and the global RNGs are restored."""
        c = self.cfg

        def features(x: torch.Tensor) -> torch.Tensor:
            if c.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if c.train.precision == "fp16":
                x = x.half()
            out, _ = module(x)  # the whole model, as ZeRO-3's parameter hooks expect
            return out

        def split(s: MonitorSplit):
            return run_over_split(self.group, features, s.shardset, s.records, self.pre, self.m.batch_size,
                                  self.m.workers, c.data.on_corrupt)

        was_training = module.training
        module.eval()
        set_batch_mask(module, None)
        try:
            # The loaders draw their base seed from the global generator: fork it so training's draws are unchanged.
            with torch.random.fork_rng(devices=[]):
                return split(self.bank), split(self.query)
        finally:
            module.train(was_training)

    def measure(self, module: torch.nn.Module, run_seconds: float) -> dict:
        """Embed both splits and score them; every rank calls it, rank 0 gets the metrics.jsonl keys.

        run_seconds: the wall time of this launch so far, for the monitor's share of it.
        """
        t0 = time.perf_counter()
        bank, query = self.embed(module)
        out = self.score(bank.values[bank.present], self.bank.labels[bank.present],
                         query.values[query.present], self.query.labels[query.present]) if self.group.is_main_process else {}
        seconds = time.perf_counter() - t0
        self.total_s += seconds
        if self.group.is_main_process:
            share = self.total_s / max(run_seconds + seconds, 1e-9)
            out.update(monitor_s=round(seconds, 3), monitor_share=round(share, 4))
            if share > MAX_SHARE and run_seconds > 0:
                log.warning("the monitor has taken %.0f%% of this run's time so far: raise monitor.every or lower "
                            "monitor.max_images", 100 * share)
        return out

    def score(self, xb: np.ndarray, yb: np.ndarray, xq: np.ndarray, yq: np.ndarray) -> dict:
        """kNN (and probe) metrics of query features xq against bank features xb, as metrics.jsonl keys."""
        task, names, n = self.spec.task, self.spec.names, len(self.spec.names)
        out = self._keys("knn", metric_arrays(task, yq, knn_scores(xb, yb, xq, task=task, k=self.m.k,
                                                                    temperature=self.m.temperature,
                                                                    num_classes=n).double().numpy(), names=names))
        if self.m.linear:
            probe = fit_logistic(xb, yb, task=task, l2=self.m.linear_l2, num_outputs=n, max_iter=200, tol=1e-5,
                                 dtype=torch.float32)
            scores = probe.predict_proba(torch.as_tensor(xq, dtype=torch.float32)).double().numpy()
            out.update(self._keys("linear", metric_arrays(task, yq, scores, names=names)))
        return out

    def _keys(self, prefix: str, arrays: dict) -> dict:
        if self.spec.task == "multiclass":
            picked = {"top1": "accuracy", "bal_acc": "balanced_accuracy", "auc": "auc_macro"}
        else:
            picked = {"auc": "auc_mean"}
        return {f"{prefix}_{k}": _finite(arrays[v][0]) for k, v in picked.items()}


def _finite(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None  # JSON has no NaN: an undefined AUC (one class present) is null


def open_monitor(cfg: RunConfig, policy, device: torch.device, autocast=None) -> KnnMonitor | None:
    return KnnMonitor(cfg, policy, device, autocast or contextlib.nullcontext) if cfg.monitor.shards else None
