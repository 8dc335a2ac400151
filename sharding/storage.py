"""Paths on any fsspec filesystem (local, file://, s3://, gs://): opening, joining, atomic publishing."""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import Iterator

from fsspec.core import url_to_fs

# On object stores an upload becomes visible only when it completes, so writing straight to the final
# key is already atomic; a rename there would be a full server-side copy.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


class Location:
    """A folder on some filesystem, addressed by the URL the user gave."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if url not in ("/",) else url
        self.fs, self.root = url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.is_object_store = bool(set(protocols) & _OBJECT_STORES)
        self.is_local = "file" in protocols or "local" in protocols

    def path(self, *parts: str) -> str:
        """The filesystem path (no protocol) of a file below this folder."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def url_of(self, *parts: str) -> str:
        """The URL (with protocol) of a file below this folder, for messages and other processes."""
        return self.fs.unstrip_protocol(self.path(*parts)) if not self.is_local else self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        if not self.is_object_store:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    @contextlib.contextmanager
    def atomic_open(self, *parts: str, durable: bool = False) -> Iterator:
        """Open a file for writing that appears under its final name only once fully written.

        A process killed mid-write (kill -9) leaves at most a temporary file, never a partial final one.
        `durable` also flushes it to disk before the rename, so a power loss cannot leave a named but
        empty file; worth its cost for shards, not for the small files written after them.
        """
        pending = AtomicWrite(self, parts, durable)
        try:
            yield pending.file
        except BaseException:
            pending.abort()
            raise
        pending.commit()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.atomic_open(*parts) as f:
            f.write(data)



class AtomicWrite:
    """A file of a Location being written under a temporary name; `commit` publishes it.

    The same guarantees as Location.atomic_open, split in two so that the slow end (fsync, rename)
    can run in another thread while the next file is written.
    """

    def __init__(self, loc: Location, parts: tuple[str, ...], durable: bool = False):
        self._loc, self._durable = loc, durable
        self._final = loc.path(*parts)
        if loc.is_object_store:  # an upload becomes visible only when complete: no temporary name
            self._tmp = None
            self.file = loc.fs.open(self._final, "wb")
            return
        parent = posixpath.dirname(self._final)
        loc.fs.makedirs(parent, exist_ok=True)
        tmp_name = f".{posixpath.basename(self._final)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = posixpath.join(parent, tmp_name)
        self.file = loc.fs.open(self._tmp, "wb")

    def commit(self) -> None:
        try:
            if self._durable and self._loc.is_local and self._tmp is not None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if self._tmp is not None:
                self._loc.fs.mv(self._tmp, self._final)
        finally:
            self._remove_tmp()

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp is not None and self._loc.fs.exists(self._tmp):
            self._loc.fs.rm(self._tmp)
