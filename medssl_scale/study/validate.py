"""Every check a study can make before its first cell runs, so bad input is one line (exit 2), not N failed
cells: each init file is read and fitted to its architecture, the splits and label columns exist, the
metric is one the task reports. Each check is the eval job's own code, run once instead of once per cell.

What depends on a single cell's draw (a fraction too small to keep a patient per class) is left to that
cell: it fails with the eval job's one line, the study reports it and runs the others.
"""

from __future__ import annotations

from ..config import ConfigError
from .aggregate import default_metric, metric_names
from .cells import Cell
from .config import StudyConfig


def check_encoders(cells: list[Cell]) -> None:
    from ..finetune.encoder import load_encoder_for_eval

    seen = set()
    for cell in cells:
        if cell.encoder is None or cell.init in seen:
            continue  # random init: its architecture keys were checked with the config
        seen.add(cell.init)
        try:
            load_encoder_for_eval(cell.config)
        except ConfigError as e:
            raise ConfigError(f"inits.{cell.init}: {e}") from None


def check_data(cell: Cell) -> tuple[str, list[str]]:
    """(task type, class or label names) of the shards, after the splits are found."""
    from ..finetune.labels import label_spec
    from ..finetune.splits import manifest_labels, open_split

    cfg = cell.config
    for key in ("train_split", "val_split", "test_split"):
        split = getattr(cfg.data, key)
        if split is not None:
            open_split(cfg.data.shards, split, f"data.{key}")
    spec = label_spec(cfg.task, manifest_labels(cfg.data.shards), cfg.data.shards)
    return spec.task, list(spec.names)


def resolve_metric(study: StudyConfig, task: str, names: list[str] | None) -> str:
    metric = study.metric or default_metric(task)
    if names is not None and metric not in metric_names(task, names):
        raise ConfigError(f"metric={metric!r} is not a metric of this {task} task: one of "
                          f"{', '.join(metric_names(task, names))}")
    return metric


def validate(study: StudyConfig, cells: list[Cell]) -> str:
    """Raise the first problem as one ConfigError line; return the metric the study reports."""
    if not cells:
        raise ConfigError("the study has no cells")
    task, names = check_data(cells[0])
    check_encoders(cells)
    return resolve_metric(study, task, names)
