"""The job's train / validation / test image sets: opened, labelled, the label fraction drawn by patient.

Everything here runs before any model or process group exists, so every bad input (absent split or
label column, a fraction too small to keep a patient per class) is one line before any work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError
from ..data.shardset import ShardSet, ShardSetError
from ..evaluate.errors import FractionError
from ..evaluate.fractions import sample_label_fraction, split_validation
from .config import EvalConfig
from .images import ImageRecord, read_records
from .labels import LabelSpec, label_spec


@dataclass
class ImageSet:
    """The labelled images of one role (train, val, test): `records[i]` has target `labels[i]`."""

    role: str
    shardset: ShardSet
    records: list[ImageRecord]         # every image of the shard split (features are cached per split)
    index: np.ndarray                  # positions into records used for this role
    labels: np.ndarray                 # (len(index),) int64 or (len(index), L) float32 with NaN
    unlabelled: int = 0                # images of the split left out: no usable label

    @property
    def patient_ids(self) -> np.ndarray:
        return np.array([self.records[i].patient_id for i in self.index], dtype=object)

    def counts(self) -> dict:
        return {f"n_{self.role}_images": int(self.index.size),
                f"n_{self.role}_patients": int(len(set(self.patient_ids.tolist()))),
                f"n_{self.role}_split_unlabelled": self.unlabelled}


@dataclass
class JobSets:
    spec: LabelSpec
    train: ImageSet | None
    val: ImageSet | None
    test: ImageSet
    fraction: dict = field(default_factory=dict)   # FractionSample.summary(), validation carve-out


def open_split(url: str, split: str, key: str) -> ShardSet:
    try:
        return ShardSet.open(url, split)
    except ShardSetError as e:
        raise ConfigError(f"{key}={split}: {e}") from None


def manifest_labels(url: str) -> dict:
    from sharding.storage import Location
    try:
        return json.loads(Location(url).read_bytes("manifest.json")).get("labels") or {}
    except FileNotFoundError:
        raise ConfigError(f"data.shards={url}: no manifest.json (is it a finished `medssl-shard build` OUTPUT?)") from None
    except ValueError as e:
        raise ConfigError(f"data.shards={url}: manifest.json is not valid JSON ({e})") from None


def labelled_set(role: str, shardset: ShardSet, spec: LabelSpec) -> ImageSet:
    """Every image of the split with a usable label (the others counted as unlabelled)."""
    records = read_records(shardset)
    keep, targets = [], []
    for i, rec in enumerate(records):
        t = spec.encode(rec.labels)
        if t is not None:
            keep.append(i)
            targets.append(t)
    if not keep:
        raise ConfigError(f"split {shardset.split!r} of {shardset.url} has no image with a usable "
                          f"{', '.join(spec.columns)} label")
    labels = np.array(targets, dtype=np.int64) if spec.task == "multiclass" else np.stack(targets).astype(np.float32)
    return ImageSet(role, shardset, records, np.array(keep, dtype=np.int64), labels, len(records) - len(keep))


def _subset(s: ImageSet, rows: np.ndarray, role: str) -> ImageSet:
    return ImageSet(role, s.shardset, s.records, s.index[rows], s.labels[rows], s.unlabelled)


def build_sets(cfg: EvalConfig, classes: list[str] | None = None, test_only: bool = False) -> JobSets:
    """Open the splits `cfg` names and label them; draw the training fraction. `classes`: a saved model's."""
    d = cfg.data
    labels = manifest_labels(d.shards)
    if not test_only:
        roles = {"data.train_split": d.train_split, "data.val_split": d.val_split, "data.test_split": d.test_split}
        named = [(k, v) for k, v in roles.items() if v]
        for i, (k, v) in enumerate(named):
            for k2, v2 in named[i + 1:]:
                if v == v2:
                    raise ConfigError(f"{k} and {k2} both name split {v!r}: selection and the test score need "
                                      f"disjoint splits (data.val_split=null carves validation from train)")
    test_ss = open_split(d.shards, d.test_split, "data.test_split")
    spec = label_spec(cfg.task, labels, d.shards, classes)
    test = labelled_set("test", test_ss, spec)
    if test_only:
        return JobSets(spec, None, None, test)
    train_ss = open_split(d.shards, d.train_split, "data.train_split")
    train = labelled_set("train", train_ss, spec)
    info: dict = {}
    try:
        if d.val_split:
            val = labelled_set("val", open_split(d.shards, d.val_split, "data.val_split"), spec)
        else:
            vs = split_validation(train.patient_ids, train.labels, val_fraction=d.val_fraction, seed=cfg.seed,
                                  names=spec.names)
            val, train = _subset(train, vs.val, "val"), _subset(train, vs.train, "train")
            info["validation_carved_from_train"] = vs.summary()
        if cfg.label_fraction is not None or cfg.labels_per_class is not None:
            fs = sample_label_fraction(train.patient_ids, train.labels, label_fraction=cfg.label_fraction,
                                       labels_per_class=cfg.labels_per_class, seed=cfg.seed, names=spec.names)
            train = _subset(train, fs.indices, "train")
            info["fraction"] = fs.summary()
    except FractionError as e:
        raise ConfigError(str(e)) from None
    if spec.task == "multiclass" and np.unique(train.labels).size < 2:
        raise ConfigError(f"the training images hold only class {spec.names[int(train.labels[0])]}: "
                          f"a classifier needs two")
    return JobSets(spec, train, val, test, info)
