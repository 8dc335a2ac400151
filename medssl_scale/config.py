"""Typed, strict run configuration: YAML plus dotted command-line overrides, nothing accepted silently."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key to fix."""


@dataclass
class DataConfig:
    shards: str = "demo-out/shards"      # a medssl-shard build: local path or fsspec URL
    split: str = "train"
    mode: str = "micle"                  # micle: two images of one patient; simclr: one image, two views
    backend: str = "auto"                # auto (DALI on GPU, torchvision on CPU) | dali | torchvision
    workers: int = 2                     # DataLoader processes (torchvision) or DALI threads
    on_corrupt: str = "skip"             # skip | error


@dataclass
class ModelConfig:
    depth: int = 50
    width: int = 1
    small_input: bool = False            # 3x3 stem without max-pool, for 32-64 px images
    zero_init_residual: bool = True      # last BN scale of each residual block starts at 0 (SimCLR, Goyal et al.)
    head_layers: int = 2
    head_hidden: int = 2048
    out_dim: int = 128
    global_bn: bool = True               # batch statistics over all ranks (SimCLR); else per process
    channels_last: bool = False
    init_encoder: str | None = None      # encoder.pt of an earlier stage (local path or URL)


@dataclass
class LossConfig:
    temperature: float = 0.1
    exclude_same_patient: bool = True    # other entries of a patient are not negatives
    chunk_size: int | None = None        # queries per chunk; None: chosen from the batch size


@dataclass
class OptimConfig:
    name: str = "lars"                   # lars | sgd | adamw
    base_lr: float = 0.3
    lr_scaling: str = "linear"           # linear: base x B/256 | sqrt: base x sqrt(B) | none
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_steps: int = 0
    final_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only


@dataclass
class TrainConfig:
    global_batch: int = 4096             # pairs per optimizer step over all ranks: the source of truth
    grad_accum: int = 1                  # micro-batches per step; micro = global / (accum x world)
    steps: int = 0                       # optimizer steps (0: use epochs)
    epochs: float = 0.0
    precision: str = "fp32"              # fp32 | bf16 | fp16
    zero_stage: int = 0
    grad_clip: float = 0.0               # 0: off
    activation_checkpointing: bool = False  # recompute ResNet stages in backward to save memory
    log_every: int = 10
    checkpoint_every: int = 1000
    checkpoint_dir: str | None = None    # default: <run_dir>/checkpoints
    keep_checkpoints: int = 2
    tensorboard: bool = False            # also write the metrics as TensorBoard events (<run_dir>/tensorboard)
    collapse_warning: float = 0.2        # warn when embed_std < this x 1/sqrt(model.out_dim); 0: never
    extend: bool = False                 # resume a run whose checkpoints were made for fewer (or more) steps


@dataclass
class TaskConfig:
    type: str = "multiclass"             # multiclass (softmax) | multilabel (sigmoid per label)
    column: str = "class"                # multiclass: the shards' label column
    columns: list[str] = field(default_factory=list)  # multilabel: one column per label
    preset: str | None = None            # chexpert: its five conditions as columns, uncertain -1
    mapping: dict = field(default_factory=dict)  # multiclass: value -> new class name, or null to drop
    uncertain: str = "ignore"            # multilabel: ignore (masked) | zeros | ones
    positive: list[str] = field(default_factory=lambda: ["1", "1.0", "true", "yes", "positive"])
    negative: list[str] = field(default_factory=lambda: ["0", "0.0", "false", "no", "negative"])
    uncertain_values: list[str] = field(default_factory=lambda: ["-1", "-1.0", "uncertain"])


@dataclass
class PreprocessConfig:
    size: int | None = None              # null: the encoder's pretraining size (monitor: augment.size)
    crop_fraction: float = 0.875         # resize the short side to size / crop_fraction, then center crop
    mean: list[float] | None = None      # null: the encoder's normalization (monitor: the run's)
    std: list[float] | None = None


def check_preprocess(p: PreprocessConfig, prefix: str, null_size: str) -> None:
    """The preprocess keys of the evaluation job and the monitor, one line per mistake."""
    if p.size is not None and p.size < 8:
        raise ConfigError(f"{prefix}preprocess.size={p.size}: must be at least 8 pixels (null: {null_size})")
    if not 0 < p.crop_fraction <= 1:
        raise ConfigError(f"{prefix}preprocess.crop_fraction={p.crop_fraction}: must be in (0, 1]")
    for key in ("mean", "std"):
        v = getattr(p, key)
        if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
            raise ConfigError(f"{prefix}preprocess.{key} must list 3 values (std positive), got {v}")


@dataclass
class MonitorConfig:
    """A learning signal during pretraining: the current encoder's kNN (and linear probe) on labelled shards."""

    shards: str | None = None            # a labelled medssl-shard build (local path or fsspec URL); null: off
    train_split: str = "train"           # the kNN bank (and the probe's training images)
    eval_split: str = "val"              # the images scored
    task: TaskConfig = field(default_factory=TaskConfig)  # label column(s), as in the evaluation job
    every: int = 1000                    # steps between measurements; also at step 0 and at the end; 0: only those
    max_images: int = 2000               # per split, a fixed seeded draw: bounds memory and time
    batch_size: int = 128                # images per forward pass, per process
    workers: int = 1                     # DataLoader processes decoding monitor images
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    k: int = 20                          # kNN neighbours (DINO's default)
    temperature: float = 0.07            # kNN vote temperature (DINO's default)
    linear: bool = False                 # also an L-BFGS linear probe (fit on train, scored on eval)
    linear_l2: float = 1.0e-4            # its L2 strength (fixed: the monitor selects nothing on its eval split)


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: dict = field(default_factory=lambda: {"preset": "simclr", "size": 224})
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def content_hash(self, data_fingerprint: str | None = None) -> str:
        """What must match for a resume: what changes the trained weights, nothing else.

        Left out: where things are read and written (run_dir, checkpoint_dir, data.shards, which
        `data_fingerprint`, the shard build's identity, replaces), how fast they are read (data.workers,
        data.backend: both backends draw every augmentation parameter from the same per-sample seeds),
        reporting (log_every, tensorboard, checkpoint cadence) and the run's length (train.steps/epochs:
        a finished run may be extended, see train.extend).
        """
        d = self.as_dict()
        d.pop("run_dir")
        d.pop("monitor")  # measures the encoder, never changes it
        for key in ("checkpoint_dir", "log_every", "tensorboard", "steps", "epochs", "extend", "checkpoint_every",
                    "keep_checkpoints", "collapse_warning"):
            d["train"].pop(key, None)
        for key in ("shards", "workers", "backend"):
            d["data"].pop(key)
        d["data"]["fingerprint"] = data_fingerprint if data_fingerprint is not None else self.data.shards
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_CHOICES = {
    "data.mode": ("micle", "simclr"), "data.backend": ("auto", "dali", "torchvision"),
    "data.on_corrupt": ("skip", "error"), "optim.name": ("lars", "sgd", "adamw"),
    "optim.lr_scaling": ("linear", "sqrt", "none"), "train.precision": ("fp32", "bf16", "fp16"),
    "train.zero_stage": (0, 1, 2, 3), "model.depth": (18, 34, 50, 101, 152),
    "monitor.task.type": ("multiclass", "multilabel"), "monitor.task.preset": (None, "chexpert"),
    "monitor.task.uncertain": ("ignore", "zeros", "ones"),
}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, typing.get_args(kind)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (typing.Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kind = dict
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # PyYAML reads 1e-6 or 1.0e30 (no dot or sign) as strings
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str, choices: dict | None = None):
    choices = _CHOICES if choices is None else choices
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {where!r}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{where}.", choices)
        else:
            values[key] = _coerce(value, kind, where)
            if where in choices and values[key] not in choices[where]:
                raise ConfigError(f"{where}: {values[key]!r} is not one of {list(choices[where])}")
    return cls(**values)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_tree(path: str | None, overrides: list[str] = ()) -> dict:
    """The YAML file's mapping (empty without a file) with `key.sub=value` overrides applied (values as YAML)."""
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: write key.subkey=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys at the top level")
    return tree


def build_config(cls, tree: dict, choices: dict | None = None):
    """A dataclass config `cls` from a nested mapping, strictly (unknown keys, wrong types, bad choices)."""
    return _build(cls, tree, "", choices)


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply `key.sub=value` overrides (values parsed as YAML)."""
    return build_config(RunConfig, load_tree(path, overrides))


def dump_config(cfg: RunConfig) -> str:
    d = cfg.as_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)
