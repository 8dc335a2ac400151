"""Run a build: make or load the plan, write this task's missing shards, then the manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import posixpath
import shlex
import sys
import time
from typing import Iterable, Iterator

from . import __version__, layout
from .errors import RunError
from .manifest import write_manifest
from .options import BuildOptions
from .plan import encode_settings, make_plan
from .progress import ImageProgress
from .sources import enumerate_source
from .storage import Location
from .tarwriter import TarShardWriter
from .worker import EncodeSettings, configure, process


def _dumps(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _fingerprint(opts: BuildOptions) -> str:
    return hashlib.sha256(_dumps(opts.content_options())).hexdigest()


def _output_inside_source(opts: BuildOptions, out: Location) -> str | None:
    src = Location(opts.source)
    if src.fs.protocol != out.fs.protocol:
        return None
    rel = posixpath.relpath(out.root, src.root)
    return None if rel.startswith("..") else rel


def _check_output(out: Location) -> None:
    """Refuse an OUTPUT we cannot write, or one holding something other than a build, before any work."""
    try:
        if out.exists(*layout.PLAN):
            return
        # _build may already be there: a sibling array task that started a moment earlier.
        foreign = [p for p in (out.fs.ls(out.root) if out.fs.isdir(out.root) else [])
                   if posixpath.basename(p.rstrip("/")) not in ("_build",) and not posixpath.basename(p).startswith(".")]
        if foreign:
            raise RunError(f"OUTPUT {out.url} is not empty and holds no medssl-shard build: "
                           "choose a new or empty folder")
        out.write_bytes(b"ok", "_build", ".write-probe")
    except RunError:
        raise
    except OSError as e:
        raise RunError(f"OUTPUT {out.url} is not writable: {e.strerror or e}") from None


def load_plan(out: Location) -> dict:
    if not out.exists(*layout.PLAN):
        raise RunError(f"{out.url} holds no build plan ({'/'.join(layout.PLAN)}): run `medssl-shard build` first")
    return json.loads(gzip.decompress(out.read_bytes(*layout.PLAN)))


def _plan(opts: BuildOptions, out: Location, log) -> dict:
    """Load the stored plan (resume, later array tasks) or make and store it."""
    fingerprint = _fingerprint(opts)
    if out.exists(*layout.PLAN):
        plan = load_plan(out)
        if plan["fingerprint"] != fingerprint:
            raise RunError(f"OUTPUT {out.url} holds a build made with other options or input: "
                           "use a new OUTPUT folder (or the same options to resume)")
        return plan
    log(f"listing {opts.source} ...")
    records, skips = enumerate_source(opts, exclude=_output_inside_source(opts, out))
    plan = make_plan(records, skips, opts)
    plan.update(fingerprint=fingerprint, options=opts.content_options(), tool_version=__version__,
                command=shlex.join(["medssl-shard", *sys.argv[1:]]) if sys.argv else "")
    # gzip with mtime=0 so the stored plan is itself reproducible.
    out.write_bytes(gzip.compress(_dumps(plan), mtime=0), *layout.PLAN)
    return plan


def _sample_json(sample: dict, kept: list[tuple[dict, object]]) -> dict:
    images = []
    for i, (rec, enc) in enumerate(kept):
        entry = {"member": f"{i}.{enc.ext}", "source": rec["source"], "labels": rec["labels"],
                 "width": enc.width, "height": enc.height, "mode": enc.mode, "source_sha256": enc.source_sha256}
        if rec["row"] is not None:
            entry["row"] = rec["row"]
        if enc.pixel_sha256:
            entry["pixel_sha256"] = enc.pixel_sha256
        if enc.dicom or rec["dicom"]:
            entry["dicom"] = enc.dicom or rec["dicom"]
        images.append(entry)
    return {"schema_version": 1, "key": sample["key"], "patient_id": sample["patient_id"],
            "split": sample["split"], "bag": sample["bag"], "bags": sample["bags"], "images": images}


def _remove_stale_temporaries(out: Location, split: str, name: str) -> None:
    """A run killed mid-write leaves `.shard-N.tar.tmp-*` behind; only this shard's owner removes them."""
    if not out.is_object_store:
        for path in out.fs.glob(out.path(split, f".{name}.*.tmp-*")):
            out.fs.rm(path)


def _write_shard(out: Location, shard: dict, results: Iterator) -> dict:
    """Write one shard from its samples and their encoded images (in plan order); returns its stats."""
    split, name = shard["split"], shard["name"]
    _remove_stale_temporaries(out, split, name)
    written, skipped, images = [], [], 0
    with out.atomic_open(*layout.shard_tar(split, name), durable=True) as f:
        writer = TarShardWriter(f)
        for sample in shard["samples"]:
            kept = []
            for rec in sample["images"]:
                result = next(results)
                if isinstance(result, str):
                    skipped.append({"source": rec["source"], "reason": result,
                                    **({"row": rec["row"]} if rec["row"] is not None else {})})
                else:
                    kept.append((rec, result))
            if not kept:
                continue
            meta = _sample_json(sample, kept)
            writer.add_sample(sample["key"], [("json", _dumps(meta))] + [(m["member"], enc.data)
                                                                         for m, (_, enc) in zip(meta["images"], kept)])
            images += len(kept)
            written.extend({"source": m["source"], "row": m.get("row"), "patient_id": sample["patient_id"],
                            "labels": m["labels"], "source_sha256": m["source_sha256"],
                            "pixel_sha256": m.get("pixel_sha256")} for m in meta["images"])
        sha, size, index = writer.close()
    out.write_bytes(index.encode(), *layout.shard_index(split, name))
    stats = {"split": split, "name": name, "path": "/".join(layout.shard_tar(split, name)),
             "index": "/".join(layout.shard_index(split, name)), "samples": writer.samples, "images": images,
             "bytes": size, "sha256": sha, "written": written, "skipped": skipped}
    out.write_bytes(_dumps(stats), *layout.shard_stats(split, name))  # last: marks the shard done
    return stats


class _Encoder:
    """Encodes images in order, in a pool of worker processes (or in-process for one worker)."""

    def __init__(self, settings: EncodeSettings, workers: int, items: int):
        self._pool = None
        configure(settings)
        if workers > 1 and items > 1:
            # fork starts instantly; spawn is needed when fsspec may hold event loops and sockets
            # (s3fs, gcsfs), which are not safe across a fork.
            ctx = multiprocessing.get_context("fork" if Location(settings.source_url).is_local else "spawn")
            self._pool = ctx.Pool(min(workers, items), initializer=configure, initargs=(settings,))

    def map(self, items: list) -> Iterable:
        return map(process, items) if self._pool is None else self._pool.imap(process, items, chunksize=16)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()


def build(opts: BuildOptions, show_progress: bool = True, log=lambda msg: None) -> dict | None:
    """Build this task's share of the shards; returns the manifest once every shard of the plan exists."""
    opts.validate()
    out = Location(opts.output)
    _check_output(out)
    plan = _plan(opts, out, log)
    mine = [s for j, s in enumerate(plan["shards"]) if j % opts.num_tasks == opts.task_index]
    todo = [s for s in mine if not out.exists(*layout.shard_stats(s["split"], s["name"]))]
    items = [rec["source"] for shard in todo for sample in shard["samples"] for rec in sample["images"]]
    log(f"{len(plan['shards'])} shards planned, {len(mine)} for this task, {len(todo)} to write "
        f"({len(items)} images, {opts.workers} workers)")
    started = time.perf_counter()
    # The pool starts before the progress bar, whose refresh thread must not be forked.
    encoder = _Encoder(encode_settings(opts), opts.workers, len(items))
    try:
        with ImageProgress(len(items), enabled=show_progress) as progress:
            results = progress.track(encoder.map(items))
            for shard in todo:
                _write_shard(out, shard, results)
    finally:
        encoder.close()
    log(f"wrote {len(todo)} shards in {time.perf_counter() - started:.1f} s")
    missing = [s for s in plan["shards"] if not out.exists(*layout.shard_stats(s["split"], s["name"]))]
    if missing:
        log(f"{len(missing)} shards of other tasks are not written yet: run `medssl-shard merge` when all are done")
        return None
    return write_manifest(out, plan)
