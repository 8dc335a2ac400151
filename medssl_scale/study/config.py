"""The study's configuration: strict like every other config here (medssl_scale.config.build_config), plus the
checks a sweep needs that a single run does not (duplicate names, fractions in (0, 1], keys the study owns).

Relative local paths (study_dir, base.config, the init files, data.shards, feature_cache) are resolved
against the current folder once, here: cells then run the same from any folder, and on any Slurm node.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, build_config, load_tree
from ..finetune.config import PROTOCOLS

BACKENDS = ("local", "slurm")
LAUNCHERS = ("python", "accelerate")
# What the study sets in every cell: base.overrides may not set them (the sweep would silently lose).
CELL_KEYS = ("run_dir", "encoder", "protocol", "label_fraction", "labels_per_class", "seed", "feature_cache",
             "classifier")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # an init name is a folder name


@dataclass
class StudyBase:
    config: str | None = None            # an evaluation config file (configs/ham_linear.yaml); null: defaults
    overrides: dict = field(default_factory=dict)  # dotted keys (or nested sections) applied to every cell


@dataclass
class LauncherConfig:
    kind: str = "python"                 # python: `python launch/finetune.py` | accelerate: `accelerate launch`
    num_processes: int | None = None     # accelerate: processes per cell (null: accelerate's default)
    cpu: bool = False                    # accelerate --cpu (gloo CPU processes)
    args: list[str] = field(default_factory=list)  # more `accelerate launch` arguments


@dataclass
class SlurmConfig:
    partition: str | None = None         # null: the cluster's default partition
    time: str = "04:00:00"               # per cell (quote it in YAML: 04:00:00 unquoted is a number)
    cpus_per_task: int = 4
    max_parallel: int | None = None      # at most this many cells at once (the array's %N throttle)
    args: list[str] = field(default_factory=list)  # more sbatch arguments for the cells: --gpus-per-task=1, --mem=32G


@dataclass
class StudyConfig:
    study_dir: str = "runs/study"
    base: StudyBase = field(default_factory=StudyBase)
    inits: dict = field(default_factory=lambda: {"random": None})  # name -> encoder.pt / state_dict / null
    baseline: str = "random"             # the init whose mean at fraction 1.0 the headline compares with
    protocols: list[str] = field(default_factory=lambda: ["linear"])
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.5, 1.0])  # of the training patients
    seeds: list[int] = field(default_factory=lambda: [0])
    metric: str | None = None            # null: balanced_accuracy (multiclass) | auc_mean (multilabel)
    feature_cache: str | None = None     # null: <study_dir>/.feature-cache, shared by every cell
    backend: str = "local"               # local | slurm
    workers: int = 1                     # local: cells run at once
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def cache_dir(self) -> str:
        return self.feature_cache or str(Path(self.study_dir) / ".feature-cache")


_CHOICES = {"backend": BACKENDS, "launcher.kind": LAUNCHERS}


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; two inits with one name would silently become one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1}): "
                                  f"each key, init names included, must be unique")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _no_duplicate_keys(path: str | None) -> None:
    if not path:
        return
    try:
        yaml.load(Path(path).read_text(), Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except (OSError, yaml.YAMLError):
        pass  # load_tree reports a missing or invalid file in its own words


def is_url(path: str) -> bool:
    return "://" in path


def resolve(path: str | None) -> str | None:
    """A local path made absolute (URLs as they are): cells must find it from any folder and node."""
    if path is None or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))  # not Path.resolve: keep the user's symlinks as named


def _unique(name: str, values: list) -> None:
    dup = sorted({repr(v) for v in values if values.count(v) > 1})
    if dup:
        raise ConfigError(f"{name} lists {', '.join(dup)} more than once")


def _check(cfg: StudyConfig) -> StudyConfig:
    if not cfg.inits:
        raise ConfigError("inits is empty: name at least one initialization, e.g. inits: {random: null}")
    for name, path in cfg.inits.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"inits: {name!r} is not a usable name (letters, digits, '.', '_', '-'; it names "
                              f"the cell folders)")
        if path is not None and (not isinstance(path, str) or not path.strip()):
            raise ConfigError(f"inits.{name}={path!r}: give an encoder.pt or state_dict path, or null for random init")
    if cfg.baseline not in cfg.inits:
        raise ConfigError(f"baseline={cfg.baseline!r} is not one of the inits ({', '.join(cfg.inits)})")
    for key in ("protocols", "fractions", "seeds"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key} is empty: the study has no cells")
        _unique(key, getattr(cfg, key))
    for p in cfg.protocols:
        if p not in PROTOCOLS:
            raise ConfigError(f"protocols: {p!r} is not one of {list(PROTOCOLS)}")
    for f in cfg.fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"fractions: {f} is not in (0, 1] (1.0 is every training patient)")
    for s in cfg.seeds:
        if s < 0:
            raise ConfigError(f"seeds: {s} is negative")
    if cfg.workers < 1:
        raise ConfigError(f"workers={cfg.workers}: must be at least 1")
    if cfg.launcher.num_processes is not None and cfg.launcher.num_processes < 1:
        raise ConfigError(f"launcher.num_processes={cfg.launcher.num_processes}: must be at least 1")
    if cfg.launcher.kind == "python" and (cfg.launcher.num_processes or cfg.launcher.cpu or cfg.launcher.args):
        raise ConfigError("launcher.num_processes / cpu / args are `accelerate launch` options: "
                          "set launcher.kind=accelerate")
    if cfg.slurm.cpus_per_task < 1 or (cfg.slurm.max_parallel is not None and cfg.slurm.max_parallel < 1):
        raise ConfigError("slurm.cpus_per_task and slurm.max_parallel must be at least 1")
    for key in cfg.base.overrides:
        head = str(key).split(".")[0]
        if head in CELL_KEYS:
            raise ConfigError(f"base.overrides.{key}: the study sets {head} in each cell "
                              f"(use inits, protocols, fractions, seeds, study_dir or feature_cache)")
    return cfg


def _resolve_paths(cfg: StudyConfig) -> StudyConfig:
    cfg.study_dir = resolve(cfg.study_dir)
    cfg.base.config = resolve(cfg.base.config)
    cfg.feature_cache = resolve(cfg.feature_cache)
    cfg.inits = {name: resolve(path) for name, path in cfg.inits.items()}
    for key in ("data.shards",):
        if isinstance(cfg.base.overrides.get(key), str):
            cfg.base.overrides[key] = resolve(cfg.base.overrides[key])
    return cfg


def load_study_config(path: str | None, overrides: list[str] = ()) -> StudyConfig:
    """The study config file with `key.sub=value` overrides, checked, its local paths made absolute."""
    _no_duplicate_keys(path)
    tree = load_tree(path, overrides)
    slurm_time = (tree.get("slurm") or {}).get("time") if isinstance(tree.get("slurm"), dict) else None
    if isinstance(slurm_time, int) and not isinstance(slurm_time, bool):
        raise ConfigError(f"slurm.time: YAML read {slurm_time!r} as a number (an unquoted 30 or 4:00:00): quote "
                          f"it as Slurm's time string, e.g. time: \"30\" (minutes) or time: \"04:00:00\"")
    if isinstance(slurm_time, str) and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", slurm_time.strip()):
        raise ConfigError(f"slurm.time={slurm_time!r} is not a Slurm time: minutes, mm:ss, hh:mm:ss, d-hh, "
                          f"d-hh:mm or d-hh:mm:ss")
    base = tree.get("base")
    if isinstance(base, dict) and isinstance(base.get("overrides"), dict):
        base["overrides"] = flatten_overrides(base["overrides"])
    return _resolve_paths(_check(build_config(StudyConfig, tree, _CHOICES)))


def flatten_overrides(overrides: dict, prefix: str = "") -> dict:
    """Nested sections to dotted leaf keys, by the evaluation config's schema: {data: {shards: S}} and
    {data.shards: S} are the same override, while a mapping-valued key (task.mapping) is replaced whole."""
    import typing

    from ..finetune.config import EvalConfig

    out: dict = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        kind, hints = EvalConfig, None
        for part in dotted.split("."):
            hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
            kind = hints.get(part)
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            out.update(flatten_overrides(value, f"{dotted}."))
        else:
            out[dotted] = value  # an unknown key is reported by the eval config's own strict check
    return out


def dump_study_config(cfg: StudyConfig) -> str:
    return yaml.safe_dump(cfg.as_dict(), sort_keys=False)
