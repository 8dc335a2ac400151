"""Re-read every shard of a finished build and check it against the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from .manifest import load_manifest
from .tarwriter import DALI_INDEX_VERSION


def _check_tar(data: bytes, entry: dict) -> list[str]:
    problems, samples, images, lines = [], set(), 0, {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                payload = tar.extractfile(member).read()
                samples.add(key)
                lines.setdefault(key, []).append(f"{ext} {member.offset_data} {member.size} {member.name}")
                if ext == "json":
                    meta = json.loads(payload)
                    if meta.get("key") != key:
                        problems.append(f"sample {key}: json names key {meta.get('key')!r}")
                else:
                    images += 1
    except (tarfile.TarError, EOFError, ValueError, OSError) as e:
        return [f"unreadable tar ({e})"]
    if len(samples) != entry["samples"]:
        problems.append(f"{len(samples)} samples, manifest says {entry['samples']}")
    if images != entry["images"]:
        problems.append(f"{images} images, manifest says {entry['images']}")
    expected_index = f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(" ".join(v) + "\n" for v in lines.values())
    return problems + ([] if entry.get("_index_text") in (None, expected_index) else ["index file does not match the tar"])


def verify(url: str) -> tuple[int, dict[str, list[str]]]:
    """(shards checked, {shard path: problems}) for every shard the manifest lists."""
    out, manifest = load_manifest(url)
    broken: dict[str, list[str]] = {}
    checked = 0
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            checked += 1
            try:
                data = out.read_bytes(entry["path"])
            except FileNotFoundError:
                broken[entry["path"]] = ["missing"]
                continue
            problems = []
            if len(data) != entry["bytes"]:
                problems.append(f"{len(data)} bytes, manifest says {entry['bytes']}")
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append("sha256 differs from the manifest")
            try:
                entry = {**entry, "_index_text": out.read_bytes(entry["index"]).decode()}
            except FileNotFoundError:
                problems.append(f"index file {entry['index']} missing")
            problems += _check_tar(data, entry)
            if problems:
                broken[entry["path"]] = problems
    return checked, broken
