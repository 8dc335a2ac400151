"""Deterministic tar shard writing, with the sha256 and the DALI index computed in the same pass."""

from __future__ import annotations

import hashlib
import io
import tarfile

# DALI's webdataset reader index format (the one its `wds2idx` tool writes): a header line
# "v1.2 <samples>", then one line per sample of "<ext> <data offset> <size> <member name>" per member.
DALI_INDEX_VERSION = "v1.2"


class _CountingHashWriter:
    """File wrapper that hashes and counts every byte on its way to the real file."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.raw.write(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


class TarShardWriter:
    """Writes samples (a key plus members `key.ext`) into one tar, byte-for-byte reproducibly.

    Every header field that could vary between machines or runs (mtime, owner, permissions) is fixed,
    so the same samples always give the same bytes and the same sha256.
    """

    def __init__(self, fileobj):
        self._out = _CountingHashWriter(fileobj)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self.samples = 0

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample; `members` is a list of (extension, payload), e.g. ("0.jpg", b"...")."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must contain no dots or slashes")
        parts = []
        for ext, payload in members:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            data_offset = self._tar.offset + tarfile.BLOCKSIZE
            self._tar.addfile(info, io.BytesIO(payload))
            parts.append(f"{ext} {data_offset} {len(payload)} {name}")
        self._index_lines.append(" ".join(parts))
        self.samples += 1

    def close(self) -> tuple[str, int, str]:
        """Finish the archive; returns (sha256 hex, total bytes, DALI index text)."""
        self._tar.close()
        index = f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n" + "".join(l + "\n" for l in self._index_lines)
        return self._out.sha.hexdigest(), self._out.pos, index
