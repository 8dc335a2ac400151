"""Fetch byte ranges of shards: pread on local files, concurrent range requests on object stores."""

from __future__ import annotations

import os
from collections import OrderedDict

from .shardset import ShardSet, ShardSetError


class RangeFetcher:
    """Reads (shard, start, end) ranges of one shard set; one instance per process (not fork-shared)."""

    def __init__(self, shardset: ShardSet, max_open: int = 64):
        self.shardset = shardset
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._max_open = max_open
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker must not share its parent's file offsets
            self._fds, self._pid = OrderedDict(), os.getpid()
        if shard not in self._fds:
            if len(self._fds) >= self._max_open:
                os.close(self._fds.popitem(last=False)[1])
            self._fds[shard] = os.open(self.shardset.location.path(self.shardset.shards[shard].path), os.O_RDONLY)
        self._fds.move_to_end(shard)
        return self._fds[shard]

    def fetch(self, ranges: list[tuple[int, int, int]]) -> list[bytes]:
        """The bytes of each (shard, start, end) range, in order; ShardSetError names a short shard."""
        loc = self.shardset.location
        if loc.is_local:
            out = [os.pread(self._fd(s), end - start, start) for s, start, end in ranges]
        else:
            paths = [loc.path(self.shardset.shards[s].path) for s, _, _ in ranges]
            # s3fs/gcsfs issue these concurrently: one call per batch instead of one round trip per image.
            out = loc.fs.cat_ranges(paths, [r[1] for r in ranges], [r[2] for r in ranges], on_error="raise")
        for (s, start, end), data in zip(ranges, out):
            if len(data) != end - start:
                raise ShardSetError(f"{self.shardset.shards[s].path}: truncated (wanted bytes {start}..{end}, "
                                    f"got {len(data)}); run `medssl-shard verify` on the build")
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):  # file descriptors do not travel to DataLoader worker processes
        return {"shardset": self.shardset, "_max_open": self._max_open}

    def __setstate__(self, state):
        self.__init__(state["shardset"], state["_max_open"])
