"""Read, encode and pack images into tar blocks; runs in the worker processes of a build (or in-process)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .errors import ImageError, exception_reason, strip_addresses
from .images import EncodedImage, encode_image
from .storage import Location
from .tarwriter import PackedSamples, pack_samples

_locations: dict[str, Location] = {}
_READ_RETRIES = 3


def compact_json(obj) -> bytes:
    """The one JSON spelling of everything a build stores (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _location(url: str) -> Location:
    # One filesystem object per process: fsspec instances must not be shared across a fork or spawn.
    if url not in _locations:
        _locations[url] = Location(url)
    return _locations[url]


def read_source(source_url: str, rel: str) -> bytes:
    """The bytes of one source file; a vanished file is an image problem, other I/O errors are retried
    and then raised, since a flaky network must never silently drop a valid image."""
    loc = _location(source_url)
    for attempt in range(_READ_RETRIES):
        try:
            if loc.is_local:  # plain open: fsspec's per-call overhead matters at thousands of files/s
                with open(loc.path(rel), "rb") as f:
                    return f.read()
            return loc.fs.cat_file(loc.path(rel))
        except FileNotFoundError:
            raise ImageError("missing file") from None
        except IsADirectoryError:
            raise ImageError("not an image file (a folder)") from None
        except PermissionError as e:
            raise ImageError(f"unreadable file: {e.strerror or e}") from None
        except OSError:
            if attempt == _READ_RETRIES - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class EncodeSettings:
    """What every image of a build shares; sent to each worker once, not with every image."""

    source_url: str
    max_side: int
    jpeg_quality: int
    check_decode: bool


_settings: EncodeSettings | None = None


def configure(settings: EncodeSettings) -> None:
    """Pool initializer (and the in-process path): set the settings `process` uses."""
    global _settings
    _settings = settings


def process(rel: str) -> EncodedImage | str:
    """Relative path -> the stored image, or the reason it is skipped (free of memory addresses)."""
    s = _settings
    try:
        data = read_source(s.source_url, rel)  # other OSErrors propagate: they stop the run, never skip
    except ImageError as e:
        return str(e)
    try:
        return encode_image(data, rel, s.max_side, s.jpeg_quality, s.check_decode)
    except ImageError as e:
        return strip_addresses(str(e))
    except Exception as e:  # noqa: BLE001 - a decoder may fail in any way on a corrupt file
        return f"undecodable image: {type(e).__name__}: {exception_reason(e, 100)}"


def sample_json(sample: dict, kept: list[tuple[dict, EncodedImage]]) -> dict:
    """The JSON member of one sample (see docs/shard-format.md) from its plan entry and kept images."""
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


@dataclass
class ShardPart:
    """Consecutive samples of one shard, packed, with what the shard's stats record about them."""

    packed: PackedSamples
    images: int = 0                                        # images seen (kept or skipped)
    written: list[dict] = field(default_factory=list)    # one entry per stored image
    skipped: list[dict] = field(default_factory=list)    # images that failed to read or decode


def encode_part(samples: list[dict]) -> ShardPart:
    """Plan samples -> their tar bytes: every image encoded, each sample's JSON member written.

    The bytes of a sample do not depend on where it lands in the tar, so parts encoded by any
    worker, in any order, concatenate in plan order to the same shard.
    """
    members, written, skipped, images = [], [], [], 0
    for sample in samples:
        kept = []
        for rec in sample["images"]:
            images += 1
            result = process(rec["source"])
            if isinstance(result, str):
                skipped.append({"source": rec["source"], "reason": result,
                                **({"row": rec["row"]} if rec["row"] is not None else {})})
            else:
                kept.append((rec, result))
        if not kept:
            continue
        meta = sample_json(sample, kept)
        members.append((sample["key"], [("json", compact_json(meta))]
                        + [(m["member"], enc.data) for m, (_, enc) in zip(meta["images"], kept)]))
        written.extend({"source": m["source"], "row": m.get("row"), "patient_id": sample["patient_id"],
                        "labels": m["labels"], "source_sha256": m["source_sha256"],
                        "pixel_sha256": m.get("pixel_sha256")} for m in meta["images"])
    return ShardPart(pack_samples(members), images, written, skipped)
