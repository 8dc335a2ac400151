"""Read and encode one image; runs in the worker processes of a build (and in-process for one worker)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import ImageError
from .images import EncodedImage, encode_image
from .storage import Location

_locations: dict[str, Location] = {}
_READ_RETRIES = 3


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
    """Relative path -> the stored image, or the reason it is skipped."""
    s = _settings
    try:
        data = read_source(s.source_url, rel)
    except ImageError as e:
        return str(e)
    try:
        return encode_image(data, rel, s.max_side, s.jpeg_quality, s.check_decode)
    except ImageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a decoder may fail in any way on a corrupt file
        return f"undecodable image: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
