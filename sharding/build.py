"""Run a build: make or load the plan, write this task's missing shards, then the manifest."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import posixpath
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from . import __version__, layout
from .errors import RunError
from .manifest import write_manifest
from .options import BuildOptions
from .plan import encode_settings, make_plan
from .pool import WorkerPool
from .progress import ImageProgress
from .sources import enumerate_source
from .storage import AtomicWrite, Location
from .tarwriter import TarShardWriter
from .worker import EncodeSettings, ShardPart, compact_json, configure, encode_part, process

# Images per worker task: big enough that the main process handles a few hundred blocks, not every
# image, small enough that the last tasks of a build keep every worker busy.
PART_IMAGES = 16
_FINISHING = 4  # shards at most waiting for their fsync and rename (each holds an open file)


def _fingerprint(opts: BuildOptions) -> str:
    return hashlib.sha256(compact_json(opts.content_options())).hexdigest()


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


def _plan(opts: BuildOptions, out: Location, log, encoder: "_Encoder") -> dict:
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
    encoder.start(len(records))  # the calibration images are encoded by the pool too
    plan = make_plan(records, skips, opts, map_images=lambda rels: encoder.map(process, rels))
    plan.update(fingerprint=fingerprint, options=opts.content_options(), tool_version=__version__,
                command=shlex.join(["medssl-shard", *sys.argv[1:]]) if sys.argv else "")
    # gzip with mtime=0 so the stored plan is itself reproducible; level 1 is 9x faster than 9 here.
    out.write_bytes(gzip.compress(compact_json(plan), compresslevel=1, mtime=0), *layout.PLAN)
    return plan


def _remove_stale_temporaries(out: Location, split: str, name: str) -> None:
    """A run killed mid-write leaves `.shard-N.tar.tmp-*` behind; only this shard's owner removes them."""
    if not out.is_object_store:
        for path in out.fs.glob(out.path(split, f".{name}.*.tmp-*")):
            out.fs.rm(path)


def _write_shard(out: Location, shard: dict, parts: Iterator[ShardPart], n_parts: int,
                 finisher: ThreadPoolExecutor) -> Future:
    """Write one shard from its next `n_parts` packed parts (in plan order); its fsync, rename, index
    and stats (the done marker, last) are left to `finisher`, so that the next shard starts at once."""
    split, name = shard["split"], shard["name"]
    _remove_stale_temporaries(out, split, name)
    written, skipped, images = [], [], 0
    pending = AtomicWrite(out, layout.shard_tar(split, name), durable=True)
    try:
        writer = TarShardWriter(pending.file)
        for _ in range(n_parts):
            part = next(parts)
            writer.add_packed(part.packed)
            images += len(part.written)
            written.extend(part.written)
            skipped.extend(part.skipped)
        sha, size, index = writer.close()
    except BaseException:
        pending.abort()
        raise
    stats = {"split": split, "name": name, "path": "/".join(layout.shard_tar(split, name)),
             "index": "/".join(layout.shard_index(split, name)), "samples": writer.samples, "images": images,
             "bytes": size, "sha256": sha, "written": written, "skipped": skipped}
    return finisher.submit(_finish_shard, out, pending, index, stats)


def _finish_shard(out: Location, pending: AtomicWrite, index: str, stats: dict) -> None:
    pending.commit()
    out.write_bytes(index.encode(), *layout.shard_index(stats["split"], stats["name"]))
    out.write_bytes(compact_json(stats), *layout.shard_stats(stats["split"], stats["name"]))  # marks it done


def split_into_parts(samples: list[dict], images_per_part: int | None = None) -> list[list[dict]]:
    """Consecutive runs of whole samples of about `images_per_part` (PART_IMAGES) images: the workers'
    unit of work. How samples are cut into parts never changes a byte of the shard."""
    images_per_part = images_per_part or PART_IMAGES
    parts, current, count = [], [], 0
    for sample in samples:
        current.append(sample)
        count += len(sample["images"])
        if count >= images_per_part:
            parts.append(current)
            current, count = [], 0
    return parts + ([current] if current else [])


class _Encoder:
    """Runs worker functions in order, in a pool of processes (or in-process for one worker)."""

    def __init__(self, settings: EncodeSettings, workers: int):
        self._settings, self._workers, self._pool = settings, workers, None
        configure(settings)

    def start(self, items: int) -> None:
        """Start the pool (once) for about `items` tasks; nothing to start for one worker or one task."""
        if self._pool is None and self._workers > 1 and items > 1:
            # fork starts instantly; spawn is needed when fsspec may hold event loops and sockets
            # (s3fs, gcsfs), which are not safe across a fork.
            method = "fork" if Location(self._settings.source_url).is_local else "spawn"
            self._pool = WorkerPool(min(self._workers, items), configure, (self._settings,), method)

    def map(self, fn: Callable, items: Iterable) -> Iterator:
        return map(fn, items) if self._pool is None else self._pool.map(fn, items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def build(opts: BuildOptions, show_progress: bool = True, log=lambda msg: None) -> dict | None:
    """Build this task's share of the shards; returns the manifest once every shard of the plan exists."""
    opts.validate()
    out = Location(opts.output)
    _check_output(out)
    # The pool starts before the progress bar, whose refresh thread must not be forked.
    encoder = _Encoder(encode_settings(opts), opts.workers)
    try:
        plan = _plan(opts, out, log, encoder)
        mine = [s for j, s in enumerate(plan["shards"]) if j % opts.num_tasks == opts.task_index]
        todo = [s for s in mine if not out.exists(*layout.shard_stats(s["split"], s["name"]))]
        parts = [split_into_parts(shard["samples"]) for shard in todo]
        images = sum(len(sample["images"]) for shard in todo for sample in shard["samples"])
        log(f"{len(plan['shards'])} shards planned, {len(mine)} for this task, {len(todo)} to write "
            f"({images} images, {opts.workers} workers)")
        started = time.perf_counter()
        encoder.start(sum(map(len, parts)))
        # Threads start after the pool: a fork must not copy them mid-operation.
        with ImageProgress(images, enabled=show_progress) as progress, ThreadPoolExecutor(1) as finisher:
            results = progress.track(encoder.map(encode_part, (p for shard in parts for p in shard)),
                                     weight=lambda part: part.images)
            finishing: collections.deque[Future] = collections.deque()
            for shard, shard_parts in zip(todo, parts):
                while finishing and (finishing[0].done() or len(finishing) >= _FINISHING):
                    finishing.popleft().result()  # a failed fsync or rename stops the run here
                finishing.append(_write_shard(out, shard, results, len(shard_parts), finisher))
            for f in finishing:
                f.result()
    finally:
        encoder.close()
    log(f"wrote {len(todo)} shards in {time.perf_counter() - started:.1f} s")
    missing = [s for s in plan["shards"] if not out.exists(*layout.shard_stats(s["split"], s["name"]))]
    if missing:
        log(f"{len(missing)} shards of other tasks are not written yet: run `medssl-shard merge` when all are done")
        return None
    return write_manifest(out, plan)
