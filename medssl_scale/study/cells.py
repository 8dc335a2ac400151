"""The study's cells: one evaluation run per (init, protocol, fraction, seed), each in its own folder.

A cell's folder is `<study_dir>/cells/<init>/<protocol>/f<fraction>/s<seed>` and holds, next to the eval
job's run folder files, `cell.yaml` (the eval config given to launch/finetune.py), `cell.json` (what the
folder was prepared for), `log.txt` (every attempt's output, appended) and `status.json` (the last attempt's
exit status).

Done-marker: the eval job writes metrics.json, then predictions.csv, then the plots (reliability.png last).
A cell is done when its metrics.json records the cell's config hash (EvalConfig.content_hash: every key but
run_dir, feature_cache, data.workers) and, for an init file, the sha256 of that file as it is now (a retrained
encoder.pt at the same path is another cell), and the files written after it exist (a cell killed while
writing its outputs is redone). Anything else is redone on the next run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError
from ..finetune.config import EvalConfig, dump_eval_config, load_eval_config
from .config import StudyConfig, resolve

CACHED = ("linear", "knn")            # protocols that read the shared feature cache
WRITTEN_AFTER_METRICS = ("predictions.csv", "reliability.png")


@dataclass
class Cell:
    index: int
    init: str
    protocol: str
    fraction: float
    seed: int
    dir: Path
    encoder: str | None                # the init's file (absolute), None: random init
    encoder_sha256: str | None         # the file's sha256 now: metrics.json's encoder_hash must equal it
    config_hash: str
    config: EvalConfig | None = field(default=None, repr=False)  # None: read back from cells.json
    data_sha256: str | None = None     # sha256 of the shards' manifest.json (it lists every shard's sha256)

    @property
    def name(self) -> str:
        return f"{self.init}/{self.protocol}/f{self.fraction!r}/s{self.seed}"

    @property
    def cache_group(self) -> str | None:
        """Cells that read the same cached features (the cache key is the encoder's hash, and a random
        init's hash includes its seed); None: fine-tuning reads no cache."""
        if self.protocol not in CACHED:
            return None
        return self.init if self.encoder else f"{self.init}/s{self.seed}"

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["index"], d["init"], d["protocol"], d["fraction"], d["seed"], Path(d["dir"]), d["encoder"],
                   d["encoder_sha256"], d["config_hash"], data_sha256=d.get("data_sha256"))

    def as_dict(self) -> dict:
        return {"index": self.index, "init": self.init, "protocol": self.protocol, "fraction": self.fraction,
                "seed": self.seed, "name": self.name, "dir": str(self.dir), "encoder": self.encoder,
                "encoder_sha256": self.encoder_sha256, "config_hash": self.config_hash,
                "data_sha256": self.data_sha256}


def file_sha256(url: str) -> str:
    """The sha256 of a file's bytes, streamed: the same digest the eval job records as encoder_hash."""
    import fsspec

    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def init_digests(study: StudyConfig) -> dict[str, str | None]:
    out = {}
    for name, path in study.inits.items():
        try:
            out[name] = file_sha256(path) if path else None
        except FileNotFoundError:
            raise ConfigError(f"inits.{name}: {path} not found") from None
        except OSError as e:
            raise ConfigError(f"inits.{name}: {path} cannot be read ({e.strerror or e})") from None
    return out


def as_override(key: str, value) -> str:
    """`key=value` as the eval job's command line reads it (values parsed as YAML), for any value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):  # a scalar document's end marker
        text = text[: -len("\n...")].strip()
    return f"{key}={text}"


def cell_overrides(study: StudyConfig, init: str, protocol: str, fraction: float, seed: int,
                   run_dir: Path) -> list[str]:
    own = {"run_dir": str(run_dir), "encoder": study.inits[init], "protocol": protocol,
           # 1.0 is every training patient: no draw at all, the same run as without a fraction
           "label_fraction": None if fraction == 1.0 else fraction, "labels_per_class": None, "seed": seed,
           "feature_cache": resolve(study.cache_dir), "classifier": None}
    return [as_override(k, v) for k, v in {**study.base.overrides, **own}.items()]


def cell_config(study: StudyConfig, init: str, protocol: str, fraction: float, seed: int, run_dir: Path) -> EvalConfig:
    try:
        cfg = load_eval_config(study.base.config, cell_overrides(study, init, protocol, fraction, seed, run_dir))
    except ConfigError as e:
        raise ConfigError(f"base (config {study.base.config or 'defaults'} + base.overrides): {e}") from None
    cfg.data.shards = resolve(cfg.data.shards)  # a relative path in the base file: from here, as the user meant
    return cfg


def manifest_sha256(shards: str) -> str | None:
    """The build's identity: a rebuilt shard set at the same path is other data (None: no manifest yet,
    which validation reports)."""
    try:
        return file_sha256(shards.rstrip("/") + "/manifest.json")
    except OSError:
        return None


def expand(study: StudyConfig, digests: dict[str, str | None]) -> list[Cell]:
    """The cross product inits x protocols x fractions x seeds, in that order (the index is the array id)."""
    cells, builds = [], {}
    root = Path(study.study_dir) / "cells"
    for init in study.inits:
        for protocol in study.protocols:
            for fraction in study.fractions:
                for seed in study.seeds:
                    d = root / init / protocol / f"f{float(fraction)!r}" / f"s{seed}"
                    cfg = cell_config(study, init, protocol, float(fraction), seed, d)
                    if cfg.data.shards not in builds:
                        builds[cfg.data.shards] = manifest_sha256(cfg.data.shards)
                    cells.append(Cell(len(cells), init, protocol, float(fraction), seed, d, study.inits[init],
                                      digests.get(init), cfg.content_hash(), cfg, builds[cfg.data.shards]))
    return cells


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut short by a kill: not a result


def metrics_of(cell: Cell) -> dict | None:
    """The cell's metrics.json when it is this cell's finished result, else None."""
    m = read_json(cell.dir / "metrics.json")
    if not m or m.get("config_hash") != cell.config_hash:
        return None
    if cell.encoder_sha256 is not None and m.get("encoder_hash") != cell.encoder_sha256:
        return None
    if not all((cell.dir / name).exists() for name in WRITTEN_AFTER_METRICS):
        return None
    # The eval job records the shards by path only: the folder's marker says which build it ran on.
    prepared = read_json(cell.dir / "cell.json") or {}
    if cell.data_sha256 is not None and prepared.get("data_sha256", cell.data_sha256) != cell.data_sha256:
        return None
    return m


def is_done(cell: Cell) -> bool:
    return metrics_of(cell) is not None


def identity(cell: Cell) -> dict:
    return {"config_hash": cell.config_hash, "encoder_sha256": cell.encoder_sha256, "data_sha256": cell.data_sha256}


def prepare(cell: Cell) -> Path:
    """Make the folder ready to run the cell; returns cell.yaml. A folder prepared for another config,
    encoder or shard build is moved aside first (to `<folder>.stale-N`, never deleted: its results are valid
    for what it ran): a fine-tune checkpoint in it would be refused (or, made from an older encoder file at
    the same path, resumed from the wrong weights). A folder prepared for this very cell is kept: a fine-tune
    killed midway resumes from its checkpoint."""
    marker = cell.dir / "cell.json"
    before = read_json(marker)
    if cell.dir.exists() and (before is None or {k: before.get(k) for k in identity(cell)} != identity(cell)):
        if before is not None or (cell.dir / "metrics.json").exists() or (cell.dir / "checkpoints").exists():
            n = 1
            while cell.dir.with_name(f"{cell.dir.name}.stale-{n}").exists():
                n += 1
            cell.dir.rename(cell.dir.with_name(f"{cell.dir.name}.stale-{n}"))
    cell.dir.mkdir(parents=True, exist_ok=True)
    path = cell.dir / "cell.yaml"
    path.write_text(f"# the eval config of study cell {cell.name} (launch/finetune.py --config {path})\n"
                    + dump_eval_config(cell.config))
    tmp = marker.with_name(".cell.json.tmp")  # whole or absent: a cut marker would look like another cell's
    tmp.write_text(json.dumps({**cell.as_dict(), **identity(cell)}, indent=2, sort_keys=True) + "\n")
    tmp.replace(marker)
    return path


def write_cells_json(study: StudyConfig, cells: list[Cell], path: Path) -> None:
    from .runner import launcher_dict
    doc = {"study_dir": study.study_dir, "launcher": launcher_dict(study), "cells": [c.as_dict() for c in cells]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
