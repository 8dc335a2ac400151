"""Deterministic tar shard writing, with the sha256 and the DALI index computed in the same pass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# DALI's webdataset reader index format (the one its `wds2idx` tool writes): a header line
# "v1.2 <samples>", then one line per sample of "<ext> <data offset> <size> <member name>" per member.
DALI_INDEX_VERSION = "v1.2"
BLOCK = 512
RECORD = 20 * BLOCK  # tar archives end padded to a whole record, as tarfile and GNU tar write them


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file with every variable field fixed.

    Byte-identical to what Python's tarfile writes (USTAR_FORMAT, mode 0o444, uid/gid 0, mtime 0, no
    owner names), which the tests check; built by hand because tarfile's generic path costs more
    per member than the rest of a build's main process.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    header = bytearray(
        encoded.ljust(100, b"\0")
        + b"0000444\0" + b"0000000\0" + b"0000000\0"     # mode, uid, gid
        + b"%011o\0" % size + b"00000000000\0"            # size, mtime
        + b" " * 8 + b"0" + b"\0" * 100                   # checksum placeholder, type (regular), link name
        + b"ustar\x0000" + b"\0" * 64                     # magic and version, owner and group names
        + b"\0" * 16 + b"\0" * 155                         # device numbers (none), name prefix
    ).ljust(BLOCK, b"\0")
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@dataclass
class PackedSamples:
    """Consecutive samples as tar bytes, which do not depend on where in the tar they will sit.

    `members` holds, per sample, (extension, data offset from the start of `data`, size, member name)
    for each member; the writer adds the position to the offsets. Packing runs in the worker
    processes, so a build's main process only appends finished blocks.
    """

    data: bytes = b""
    members: list[list[tuple[str, int, int, str]]] = field(default_factory=list)


def pack_samples(samples: list[tuple[str, list[tuple[str, bytes]]]]) -> PackedSamples:
    """Tar bytes of samples given as (key, [(extension, payload), ...]), e.g. ("a-0-000", [("json", b"{}")])."""
    chunks, index, pos = [], [], 0
    for key, members in samples:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must contain no dots or slashes")
        entries = []
        for ext, payload in members:
            name = f"{key}.{ext}"
            chunks.append(ustar_header(name, len(payload)))
            entries.append((ext, pos + BLOCK, len(payload), name))
            chunks.append(payload)
            pad = -len(payload) % BLOCK
            if pad:
                chunks.append(b"\0" * pad)
            pos += BLOCK + len(payload) + pad
        index.append(entries)
    return PackedSamples(b"".join(chunks), index)


class TarShardWriter:
    """Writes samples (a key plus members `key.ext`) into one tar, byte-for-byte reproducibly."""

    def __init__(self, fileobj):
        self._raw = fileobj
        self._sha = hashlib.sha256()
        self._pos = 0
        self._index_lines: list[str] = []
        self.samples = 0

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._raw.write(data)
        self._pos += len(data)

    def add_packed(self, packed: PackedSamples) -> None:
        """Append samples packed by `pack_samples` (one hash update and one write per block)."""
        base = self._pos
        self._index_lines.extend(" ".join(f"{ext} {base + offset} {size} {name}" for ext, offset, size, name in sample)
                                 for sample in packed.members)
        self.samples += len(packed.members)
        if packed.data:
            self._write(packed.data)

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample; `members` is a list of (extension, payload), e.g. ("0.jpg", b"...")."""
        self.add_packed(pack_samples([(key, members)]))

    def close(self) -> tuple[str, int, str]:
        """Finish the archive; returns (sha256 hex, total bytes, DALI index text)."""
        end = self._pos + 2 * BLOCK
        self._write(b"\0" * (2 * BLOCK + (-end) % RECORD))
        index = f"{DALI_INDEX_VERSION} {len(self._index_lines)}\n" + "".join(l + "\n" for l in self._index_lines)
        return self._sha.hexdigest(), self._pos, index
