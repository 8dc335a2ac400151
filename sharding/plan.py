"""The build plan: patients, splits, bags and shard boundaries, decided before any shard is written.

The plan is a pure function of the source listing and the content options, so every worker and every
Slurm array task derives the same shards, and a rerun after a crash knows exactly what is missing.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Callable

from .errors import RunError
from .options import BuildOptions, check_split_name
from .sources import Record, Skip
from .worker import EncodeSettings, configure, process

TAR_BLOCK = 512
_CALIBRATION_IMAGES = 32
_JSON_ESTIMATE = 2 * TAR_BLOCK + 1024


def unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) from the parts (same on every machine and Python version)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sample_key(patient_id: str, bag: int) -> str:
    """A readable, unique tar key: sanitized id, a hash against sanitizing collisions, the bag number."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", patient_id)[:48]
    return f"{safe}-{hashlib.sha256(patient_id.encode()).hexdigest()[:8]}-{bag:03d}"


def drop_duplicate_paths(records: list[Record]) -> tuple[list[Record], list[dict]]:
    """The same file under several rows: keep the first row, report the others (leak-proof choice)."""
    first: dict[str, Record] = {}
    dropped: dict[str, list[Record]] = {}
    for rec in records:
        if rec.source in first:
            dropped.setdefault(rec.source, []).append(rec)
        else:
            first[rec.source] = rec
    duplicates = []
    for source, extra in dropped.items():
        kept = first[source]
        patients = sorted({kept.patient_id, *(r.patient_id for r in extra)})
        duplicates.append({
            "kind": "same_file", "source": source, "patients": patients,
            "kept": {"row": kept.row, "patient_id": kept.patient_id},
            "dropped": [{"row": r.row, "patient_id": r.patient_id} for r in extra],
            "action": "kept under the first row's patient only, so the image cannot sit in two splits",
        })
    return [r for r in records if first[r.source] is r], duplicates


def _given_split_leak(pid: str, recs: list[Record], others: int, opts: BuildOptions) -> RunError:
    """A patient whose images name two splits: one line naming the patient, where, and what to change."""
    by_split: dict[str, str] = {}
    for r in recs:
        by_split.setdefault(r.split, r.source if r.row is None else f"row {r.row}")
    where = ", ".join(f"{name!r} ({example})" for name, example in sorted(by_split.items()))
    more = f" (and {others} more patient{'s' if others > 1 else ''})" if others else ""
    if opts.split_col:
        return RunError(f"--split-col {opts.split_col!r}: patient {pid!r}{more} has rows in splits {where}; "
                        "give each patient one split")
    return RunError(f"--split-from-folder {opts.split_from_folder}: patient {pid!r}{more} has images under split "
                    f"folders {where}, which would leak the patient across splits: move each patient's images "
                    "under one split folder (or fix --patient-regex if these are different patients)")


def assign_splits(patients: dict[str, list[Record]], opts: BuildOptions) -> dict[str, str]:
    """patient id -> split, from --split-col or --split-from-folder (all images of a patient must agree)
    or a seeded hash of the id."""
    result = {}
    if opts.split_col or opts.split_from_folder is not None:
        where = f"column {opts.split_col!r}" if opts.split_col else f"folder level {opts.split_from_folder}"
        leaks = sorted(pid for pid, recs in patients.items() if len({r.split for r in recs}) > 1)
        if leaks:
            raise _given_split_leak(leaks[0], patients[leaks[0]], len(leaks) - 1, opts)
        for pid, recs in patients.items():
            result[pid] = check_split_name(recs[0].split, where)
        return result
    bounds, total = [], 0.0
    for name, fraction in opts.splits.items():
        total += fraction
        bounds.append((total, name))
    for pid in patients:
        u = unit_hash("split", opts.seed, pid)
        result[pid] = next((name for bound, name in bounds if u < bound), bounds[-1][1])
    return result


def make_bags(patient_id: str, recs: list[Record], per_sample: int) -> list[list[Record]]:
    """Split a patient's images into near-equal bags (9 images at 8 per sample -> 5 + 4, not 8 + 1,
    so no bag is needlessly left with a single image for MICLe)."""
    n_bags = math.ceil(len(recs) / per_sample)
    base, extra = divmod(len(recs), n_bags)
    bags, start = [], 0
    for i in range(n_bags):
        size = base + (1 if i < extra else 0)
        bags.append(recs[start:start + size])
        start += size
    return bags


def _estimated_bytes(rec: Record, ratio: float) -> int:
    est = int(rec.size * ratio)
    return TAR_BLOCK + -(-est // TAR_BLOCK) * TAR_BLOCK


def encode_settings(opts: BuildOptions) -> EncodeSettings:
    return EncodeSettings(opts.source, opts.max_side, opts.jpeg_quality, opts.check_decode)


def calibrate(records: list[Record], opts: BuildOptions, map_images: Callable | None = None) -> float:
    """Stored bytes per source byte, measured on a fixed, evenly spread handful of images.

    Shard boundaries must be known before encoding (so that tasks work independently), yet resizing
    changes sizes; this deterministic estimate makes shards come out near --shard-size. With
    --max-side 0 and JPEG/PNG sources the ratio is exactly 1. `map_images` (relative paths -> results
    of worker.process, in order) lets a pool of workers encode them; by default they are encoded here.
    """
    step = max(1, len(records) // _CALIBRATION_IMAGES)
    sample = records[::step][:_CALIBRATION_IMAGES]
    if map_images is None:
        configure(encode_settings(opts))
        map_images = lambda rels: map(process, rels)  # noqa: E731
    src = out = 0
    for rec, result in zip(sample, map_images([r.source for r in sample])):
        if not isinstance(result, str):
            src += rec.size
            out += len(result.data)
    return out / src if src else 1.0


def make_plan(records: list[Record], skips: list[Skip], opts: BuildOptions,
              map_images: Callable | None = None) -> dict:
    """The whole build as JSON-able data: shards in a fixed global order, each with its samples."""
    records, duplicates = drop_duplicate_paths(records)
    patients: dict[str, list[Record]] = {}
    for rec in records:
        patients.setdefault(rec.patient_id, []).append(rec)
    split_of = assign_splits(patients, opts)
    given = opts.split_col or opts.split_from_folder is not None
    split_names = sorted(set(split_of.values())) if given else list(opts.splits)
    ordered = sorted(patients, key=lambda pid: (split_names.index(split_of[pid]),
                                                unit_hash("order", opts.seed, pid), pid))
    ratio = calibrate([r for pid in ordered for r in patients[pid]], opts, map_images)
    shards: list[dict] = []
    current: dict[str, dict] = {}
    for pid in ordered:
        split = split_of[pid]
        bags = make_bags(pid, patients[pid], opts.images_per_sample)
        for bag_index, bag in enumerate(bags):
            size = _JSON_ESTIMATE + sum(_estimated_bytes(r, ratio) for r in bag)
            shard = current.get(split)
            if shard is None or (shard["samples"] and shard["estimated_bytes"] + size > opts.shard_size):
                number = sum(1 for s in shards if s["split"] == split)
                shard = {"split": split, "name": f"shard-{number:06d}", "estimated_bytes": 0, "samples": []}
                shards.append(shard)
                current[split] = shard
            shard["estimated_bytes"] += size
            shard["samples"].append({
                "key": sample_key(pid, bag_index), "patient_id": pid, "split": split,
                "bag": bag_index, "bags": len(bags), "images": [r.as_json() for r in bag],
            })
    return {"split_names": split_names, "shards": shards, "duplicates": duplicates,
            "skipped": [s.as_json() for s in skips], "bytes_ratio": ratio}
