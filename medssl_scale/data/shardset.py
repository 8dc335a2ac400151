"""A split of a shard build, opened from its manifest and checked before any training step runs.

Reads only the manifest and the DALI index files: every sample's members and byte ranges are known
up front, so readers can fetch exactly the bytes they need, in any order, from disk or object storage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sharding.options import SCHEMA_VERSION
from sharding.storage import Location

TAR_HEADER = 512


class ShardSetError(RuntimeError):
    """The shard set cannot be used; the message names every broken shard."""


@dataclass(frozen=True)
class Shard:
    path: str            # relative to the build folder, e.g. "train/shard-000003.tar"
    bytes: int
    samples: int


@dataclass(frozen=True)
class Sample:
    """One patient bag: where its members lie in its shard."""

    shard: int                              # index into ShardSet.shards
    key: str
    json: tuple[int, int]                   # (data offset, size) of the json member
    images: tuple[tuple[str, int, int], ...]  # (member extension, data offset, size), in bag order


def _parse_index(text: str, shard: Shard, shard_no: int) -> list[Sample]:
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or int(head[1]) != len(lines) - 1:
        raise ValueError("index header does not match its lines")
    samples = []
    for line in lines[1:]:
        parts = line.split()
        members = [(parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4)]
        key = members[0][3].split(".", 1)[0]
        json_member = next((m for m in members if m[0] == "json"), None)
        images = tuple((ext, off, size) for ext, off, size, _ in members if ext != "json")
        if json_member is None or not images:
            raise ValueError(f"sample {key} lacks its json member or images")
        if max(off + size for _, off, size, _ in members) > shard.bytes:
            raise ValueError(f"sample {key} lies past the end of the shard")
        samples.append(Sample(shard_no, key, (json_member[1], json_member[2]), images))
    if len(samples) != shard.samples:
        raise ValueError(f"index lists {len(samples)} samples, manifest says {shard.samples}")
    return samples


class ShardSet:
    """The shards and samples of one split of a build (local path or any fsspec URL)."""

    def __init__(self, url: str, split: str, shards: list[Shard], samples: list[Sample], fingerprint: str = ""):
        self.url, self.split, self.shards, self.samples = url, split, shards, samples
        self.location = Location(url)
        # What the data are, not where: the same build copied to s3:// or another disk keeps it.
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.samples)

    def shard_url(self, shard: int) -> str:
        return self.location.url_of(self.shards[shard].path)

    @classmethod
    def open(cls, url: str, split: str) -> "ShardSet":
        """Load and check a split: every shard must exist with the manifest's size and a valid index.

        All problems are collected and raised together, so a user fixes them in one go, before training.
        """
        loc = Location(url)
        try:
            manifest = json.loads(loc.read_bytes("manifest.json"))
        except FileNotFoundError:
            raise ShardSetError(f"{url}: no manifest.json (is it a finished `medssl-shard build` OUTPUT?)") from None
        except ValueError as e:
            raise ShardSetError(f"{url}/manifest.json is not valid JSON: {e}") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ShardSetError(f"{url}: shard schema version {version!r}; this reader knows {SCHEMA_VERSION}")
        if split not in manifest.get("splits", {}):
            raise ShardSetError(f"{url}: no split {split!r} (splits: {', '.join(manifest.get('splits', {}))})")
        entries = manifest["splits"][split]["shards"]
        shards, samples, problems = [], [], []
        for entry in entries:
            shard = Shard(entry["path"], int(entry["bytes"]), int(entry["samples"]))
            try:
                size = loc.fs.size(loc.path(shard.path))
                if size != shard.bytes:
                    raise ValueError(f"{size} bytes, manifest says {shard.bytes} (truncated or replaced)")
                index = loc.read_bytes(entry["index"]).decode()
                samples.extend(_parse_index(index, shard, len(shards)))
            except FileNotFoundError as e:
                problems.append(f"{shard.path}: missing ({e.filename or e})")
            except (OSError, ValueError, IndexError) as e:
                problems.append(f"{shard.path}: {e}")
            shards.append(shard)
        if problems:
            raise ShardSetError(f"{url} split {split!r}: {len(problems)} unusable shard(s): " + "; ".join(problems))
        if not samples:
            raise ShardSetError(f"{url} split {split!r} has no samples")
        digest = hashlib.sha256(json.dumps([split, [{k: e.get(k) for k in ("path", "bytes", "samples", "sha256")}
                                                    for e in entries]], sort_keys=True).encode()).hexdigest()[:16]
        return cls(url, split, shards, samples, digest)
