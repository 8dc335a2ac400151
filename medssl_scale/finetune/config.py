"""The evaluation job's configuration: as strict as pretraining's (same YAML + dotted-override machinery)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import yaml

from ..config import ConfigError, PreprocessConfig, TaskConfig, build_config, check_preprocess, load_tree  # sections shared with the monitor

PROTOCOLS = ("linear", "knn", "finetune")


@dataclass
class EvalDataConfig:
    shards: str = "demo-out/shards"      # a labelled medssl-shard build: local path or fsspec URL
    train_split: str = "train"
    val_split: str | None = "val"        # null: carve val_fraction of the training patients out instead
    test_split: str = "test"
    val_fraction: float = 0.1            # only when val_split is null, drawn by patient, stratified
    batch_size: int = 256                # images per forward pass, per process (extraction and evaluation)
    workers: int = 2                     # DataLoader processes decoding images
    on_corrupt: str = "skip"             # skip: left out of features/metrics, masked from the loss | error


@dataclass
class EvalModelConfig:
    depth: int | None = None             # null: from the encoder.pt's recorded architecture (else 50)
    width: int | None = None
    small_input: bool | None = None


@dataclass
class LinearConfig:
    l2_grid: list[float] = field(default_factory=lambda: [float(f"{10 ** (-e / 2):.3g}") for e in range(12, -1, -1)])
    max_iter: int = 1000


@dataclass
class KnnConfig:
    k: list[int] = field(default_factory=lambda: [10, 20, 50, 100])   # swept, chosen on validation
    temperature: list[float] = field(default_factory=lambda: [0.07])


@dataclass
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 64                 # images per optimizer step over all processes
    optimizer: str = "adamw"             # adamw | sgd | lars
    lr: float = 1e-3                     # peak learning rate at batch_size (no scaling rule applied)
    weight_decay: float = 1e-4
    momentum: float = 0.9                # sgd, lars
    warmup_epochs: float = 1.0
    final_lr: float = 0.0
    train_from: str = "stem"             # stem (whole network) | layer1..layer4 | head (linear on frozen)
    augment: dict = field(default_factory=lambda: {"preset": "finetune"})
    patience: int = 5                    # epochs without a better validation metric before stopping; 0: off
    precision: str = "fp32"              # fp32 | bf16 | fp16 (Accelerate mixed precision)
    label_smoothing: float = 0.0


@dataclass
class ReportConfig:
    n_resamples: int = 1000              # patient bootstrap resamples for the 95% intervals
    seed: int = 0
    select_metric: str | None = None     # null: accuracy (multiclass) or auc_mean (multilabel); maximized


@dataclass
class EvalConfig:
    run_dir: str = "runs/eval"
    protocol: str = "linear"             # linear | knn | finetune
    encoder: str | None = None           # encoder.pt, a torchvision-format state_dict, or null (random init)
    seed: int = 0                        # fraction draw, validation carve-out, head init, fine-tune order
    label_fraction: float | None = None  # 0-1 of the training patients; null with labels_per_class null: all
    labels_per_class: int | None = None  # instead: whole patients per class until it has this many images
    classifier: str | None = None        # `evaluate` only: the model.pt of an earlier run to apply
    feature_cache: str | None = None     # null: <run_dir>/../.feature-cache (shared by sibling runs)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """What decides the result; where it is written (run_dir, cache) and decode speed are left out."""
        d = self.as_dict()
        for key in ("run_dir", "feature_cache"):
            d.pop(key)
        d["data"].pop("workers")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_CHOICES = {
    "protocol": PROTOCOLS, "task.type": ("multiclass", "multilabel"), "task.preset": (None, "chexpert"),
    "task.uncertain": ("ignore", "zeros", "ones"), "data.on_corrupt": ("skip", "error"),
    "finetune.optimizer": ("adamw", "sgd", "lars"), "finetune.precision": ("fp32", "bf16", "fp16"),
    "finetune.train_from": ("stem", "layer1", "layer2", "layer3", "layer4", "head"),
    "model.depth": (None, 18, 34, 50, 101, 152),
    # Selection maximizes: only metrics where larger is better (ECE is reported, never selected on).
    "report.select_metric": (None, "accuracy", "balanced_accuracy", "auc_macro", "auc_mean"),
}


def _check(cfg: EvalConfig) -> EvalConfig:
    if cfg.label_fraction is not None and cfg.labels_per_class is not None:
        raise ConfigError("label_fraction and labels_per_class are exclusive: set one of them to null")
    if cfg.label_fraction is not None and not 0 < cfg.label_fraction <= 1:
        raise ConfigError(f"label_fraction={cfg.label_fraction}: must be in (0, 1]")
    if cfg.labels_per_class is not None and cfg.labels_per_class < 1:
        raise ConfigError(f"labels_per_class={cfg.labels_per_class}: must be at least 1")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in (0, 1)")
    if cfg.data.batch_size < 1 or cfg.finetune.batch_size < 1:
        raise ConfigError("data.batch_size and finetune.batch_size must be at least 1")
    if cfg.data.workers < 0:
        raise ConfigError("data.workers must be >= 0")
    check_preprocess(cfg.preprocess, "", "the encoder's size")
    if cfg.model.width is not None and cfg.model.width < 1:
        raise ConfigError(f"model.width={cfg.model.width}: must be at least 1 (null: the encoder's)")
    if cfg.encoder is not None and not str(cfg.encoder).strip():
        raise ConfigError("encoder is empty: name an encoder.pt or a state_dict file, or write encoder=null for random init")
    if not cfg.linear.l2_grid or min(cfg.linear.l2_grid) <= 0:
        raise ConfigError("linear.l2_grid must list positive L2 strengths")
    if not cfg.knn.k or min(cfg.knn.k) < 1 or not cfg.knn.temperature or min(cfg.knn.temperature) <= 0:
        raise ConfigError("knn.k must list integers >= 1 and knn.temperature positive numbers")
    if cfg.finetune.epochs < 1:
        raise ConfigError("finetune.epochs must be at least 1")
    if cfg.finetune.final_lr > cfg.finetune.lr or cfg.finetune.warmup_epochs < 0 or cfg.finetune.lr <= 0:
        raise ConfigError("finetune: need lr > 0, 0 <= final_lr <= lr and warmup_epochs >= 0")
    if cfg.finetune.patience < 0 or not 0 <= cfg.finetune.label_smoothing < 1:
        raise ConfigError("finetune.patience must be >= 0 and finetune.label_smoothing in [0, 1)")
    sel = cfg.report.select_metric
    if sel is not None and (sel == "auc_mean") != (cfg.task.type == "multilabel"):
        raise ConfigError(f"report.select_metric={sel} is not a {cfg.task.type} metric: use "
                          + ("auc_mean" if cfg.task.type == "multilabel" else "accuracy, balanced_accuracy or auc_macro"))
    if cfg.report.n_resamples < 1:
        raise ConfigError("report.n_resamples must be at least 1")
    return cfg


def load_eval_config(path: str | None, overrides: list[str] = ()) -> EvalConfig:
    return _check(build_config(EvalConfig, load_tree(path, overrides), _CHOICES))


def dump_eval_config(cfg: EvalConfig) -> str:
    return yaml.safe_dump(cfg.as_dict(), sort_keys=False)
