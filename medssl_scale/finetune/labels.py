"""From the shards' per-image label strings to training targets: vocabulary, mapping, uncertain policy.

Multiclass: one label column; classes are the column's vocabulary from manifest.json after `task.mapping`
(value -> new name merges classes, value -> null drops them), sorted. Images whose value is missing or
dropped are left out (and counted). Multilabel: one 0/1 column per label (CheXpert style): positive and
negative strings from the config, uncertain ones (-1) by `task.uncertain`, blanks missing (NaN: masked
from the loss and the metrics); an image with no known label is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError
from .config import TaskConfig

CHEXPERT_CONDITIONS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@dataclass
class LabelSpec:
    task: str
    names: list[str]                       # classes (multiclass) or labels (multilabel), in output order
    columns: list[str]                     # the shard label columns read
    mapping: dict = field(default_factory=dict)  # multiclass: shard value -> class name or None
    positive: frozenset = frozenset()
    negative: frozenset = frozenset()
    uncertain: frozenset = frozenset()
    uncertain_as: float = math.nan         # ignore: NaN; zeros: 0; ones: 1

    def encode(self, labels: dict) -> int | np.ndarray | None:
        """The target of one image's `labels` dict, or None when it has no usable label."""
        if self.task == "multiclass":
            value = labels.get(self.columns[0])
            name = None if value is None else self.mapping.get(value, value)
            return None if name is None else self.names.index(name)
        out = np.full(len(self.columns), np.nan, dtype=np.float32)
        for j, col in enumerate(self.columns):
            value = labels.get(col)
            v = None if value is None else str(value).strip().lower()
            if v in self.positive:
                out[j] = 1.0
            elif v in self.negative:
                out[j] = 0.0
            elif v in self.uncertain:
                out[j] = self.uncertain_as
        return None if np.isnan(out).all() else out

    def as_dict(self) -> dict:
        return {"task": self.task, "names": self.names, "columns": self.columns,
                "mapping": self.mapping or None}


def _vocabulary(manifest_labels: dict, column: str, url: str) -> list[str]:
    if column not in manifest_labels:
        have = ", ".join(sorted(manifest_labels)) or "none: build the shards with --label-cols or --class-from-folder"
        raise ConfigError(f"label column {column!r} is not in the shards at {url} (label columns: {have}); "
                          f"set task.column / task.columns")
    return [str(v) for v in manifest_labels[column].get("vocabulary", [])]


def _multiclass(task: TaskConfig, manifest_labels: dict, url: str, classes: list[str] | None) -> LabelSpec:
    vocab = _vocabulary(manifest_labels, task.column, url)
    # YAML reads `0: benign` with an integer key; shard labels are strings.
    mapping = {str(k): (None if v is None else str(v)) for k, v in task.mapping.items()}
    unknown = sorted(set(mapping) - set(vocab))
    if unknown:
        raise ConfigError(f"task.mapping names {unknown}, not values of column {task.column!r} "
                          f"(values: {', '.join(vocab)})")
    mapped = sorted({mapping.get(v, v) for v in vocab} - {None})
    if classes is None:  # training: the classes are what the data hold
        if len(mapped) < 2:
            raise ConfigError(f"column {task.column!r} has {len(mapped)} class(es) after task.mapping "
                              f"({mapped}); a classifier needs at least 2")
        classes = mapped
    else:  # a saved model on other data: every value must land on one of its classes or be dropped
        strays = sorted({v for v in vocab if mapping.get(v, v) is not None and mapping.get(v, v) not in classes})
        if strays:
            raise ConfigError(f"values {strays} of column {task.column!r} are not classes of the model "
                              f"({', '.join(classes)}): map them with task.mapping (null drops them)")
    return LabelSpec("multiclass", list(classes), [task.column], mapping)


def _multilabel(task: TaskConfig, manifest_labels: dict, url: str) -> LabelSpec:
    if task.mapping:
        raise ConfigError("task.mapping applies to multiclass tasks; a multilabel task lists task.columns")
    columns = list(CHEXPERT_CONDITIONS) if task.preset == "chexpert" and not task.columns else list(task.columns)
    if not columns:
        raise ConfigError("task.type=multilabel needs task.columns (one 0/1 column per label) or task.preset=chexpert")
    pos = frozenset(s.lower() for s in task.positive)
    neg = frozenset(s.lower() for s in task.negative)
    unc = frozenset(s.lower() for s in task.uncertain_values)
    for col in columns:
        vocab = _vocabulary(manifest_labels, col, url)
        other = sorted(v for v in vocab if v.strip().lower() not in pos | neg | unc)
        if other:
            shown = ", ".join(other[:6]) + (" ..." if len(other) > 6 else "")
            raise ConfigError(f"task.type=multilabel needs 0/1 label columns, but {col!r} holds single-label "
                              f"classes ({shown}): use task.type=multiclass task.column={col}, or list the "
                              f"values in task.positive / task.negative")
    as_value = {"ignore": math.nan, "zeros": 0.0, "ones": 1.0}[task.uncertain]
    return LabelSpec("multilabel", columns, columns, {}, pos, neg, unc, as_value)


def label_spec(task: TaskConfig, manifest_labels: dict, url: str, classes: list[str] | None = None) -> LabelSpec:
    """The LabelSpec of `task` on shards whose manifest lists `manifest_labels`; `classes`: a saved model's."""
    if task.type == "multiclass":
        if task.preset == "chexpert":
            raise ConfigError("task.preset=chexpert is a multilabel task: set task.type=multilabel")
        return _multiclass(task, manifest_labels, url, classes)
    spec = _multilabel(task, manifest_labels, url)
    if classes is not None and classes != spec.names:
        raise ConfigError(f"the model predicts labels {classes}, task.columns gives {spec.names}: list the same labels")
    return spec
