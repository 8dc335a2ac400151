"""The options of one shard build, validated up front so a bad run fails before any work."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

from .errors import RunError

SCHEMA_VERSION = 1
DEFAULT_SPLITS = "train=0.9,val=0.05,test=0.05"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_size(text: str) -> int:
    """'512MB' -> 512_000_000; KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024."""
    m = _SIZE.match(str(text))
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise RunError(f"bad size {text!r}: write a number with an optional unit, e.g. 512MB or 1GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise RunError(f"bad size {text!r}: must be positive")
    return size


def parse_splits(text: str) -> dict[str, float]:
    """'train=0.9,val=0.05,test=0.05' -> {'train': 0.9, ...}; fractions must be positive and sum to 1."""
    splits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            fraction = float(value) if sep else float("nan")
        except ValueError:
            fraction = float("nan")
        if not _SPLIT_NAME.match(name) or not fraction > 0 or name in splits:
            raise RunError(f"bad --splits {text!r}: write NAME=FRACTION,... with distinct names "
                           "of letters, digits, '_' or '-' and positive fractions (e.g. train=0.9,val=0.1)")
        splits[name] = fraction
    if not splits or abs(sum(splits.values()) - 1.0) > 1e-6:
        raise RunError(f"bad --splits {text!r}: the fractions must sum to 1")
    return splits


def check_split_name(name: str, where: str) -> str:
    if not _SPLIT_NAME.match(name):
        raise RunError(f"split name {name!r} from {where} is not usable as a folder name: "
                       "use letters, digits, '_' or '-'")
    return name


@dataclass
class BuildOptions:
    """Everything that decides the content of a build, plus how the work is spread (workers, tasks)."""

    source: str
    output: str
    manifest: str | None = None
    image_col: str = "path"
    patient_col: str | None = None
    label_cols: list[str] = field(default_factory=list)
    split_col: str | None = None
    patient_regex: str | None = None
    # Folder levels of the path relative to SOURCE: 1 = the first folder below SOURCE, 2 = the one
    # inside it, ...; -1 = the folder holding the image, -2 = its parent, ... (None: not used).
    class_from_folder: int | None = None
    split_from_folder: int | None = None
    images_per_sample: int = 8
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.9, "val": 0.05, "test": 0.05})
    seed: int = 0
    max_side: int = 512
    jpeg_quality: int = 95
    check_decode: bool = False  # --max-side 0: also decode every image, not only its structure
    shard_size: int = 512 * 10**6
    # How the work is spread; these never change a single output byte.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    task_index: int = 0
    num_tasks: int = 1

    def validate(self) -> "BuildOptions":
        if self.images_per_sample < 1:
            raise RunError("--images-per-sample must be at least 1")
        if self.max_side < 0:
            raise RunError("--max-side must be 0 (keep original bytes) or a positive number of pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise RunError("--jpeg-quality must be between 1 and 100")
        if self.workers < 1:
            raise RunError("--workers must be at least 1")
        if self.num_tasks < 1 or not 0 <= self.task_index < self.num_tasks:
            raise RunError(f"--task-index {self.task_index} must lie in [0, --num-tasks={self.num_tasks})")
        if self.manifest is None and (self.patient_col or self.label_cols or self.split_col):
            raise RunError("--patient-col, --label-cols and --split-col need --manifest FILE")
        # Before the bool type was widened to a level: True meant the first folder.
        if isinstance(self.class_from_folder, bool):
            self.class_from_folder = 1 if self.class_from_folder else None
        folder_opts = [flag for flag, value in (("--patient-regex", self.patient_regex),
                                                 ("--class-from-folder", self.class_from_folder),
                                                 ("--split-from-folder", self.split_from_folder)) if value is not None]
        if self.manifest is not None and folder_opts:
            raise RunError(f"{' and '.join(folder_opts)} apply to folder sources, not --manifest "
                           "(use --patient-col, --label-cols, --split-col there)")
        for flag, level in (("--class-from-folder", self.class_from_folder),
                            ("--split-from-folder", self.split_from_folder)):
            if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level == 0):
                raise RunError(f"{flag} {level!r}: give a folder level, 1 = the first folder below SOURCE "
                               "(2 the next, ...) or -1 = the folder holding the image (-2 its parent, ...)")
        if self.class_from_folder is not None and self.class_from_folder == self.split_from_folder:
            raise RunError(f"--class-from-folder and --split-from-folder both name folder level "
                           f"{self.class_from_folder}: give the class and the split different levels")
        if self.patient_regex is not None:
            try:
                groups = re.compile(self.patient_regex).groups
            except re.error as e:
                raise RunError(f"bad --patient-regex {self.patient_regex!r}: {e}") from None
            if groups != 1:
                raise RunError(f"--patient-regex {self.patient_regex!r} must have exactly one capture group")
        return self

    def content_options(self) -> dict:
        """The options that decide the output bytes: equal fingerprints mean identical shards."""
        d = asdict(self)
        for k in ("workers", "task_index", "num_tasks", "output"):
            d.pop(k)
        d["schema_version"] = SCHEMA_VERSION
        return d
