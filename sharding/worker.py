"""Read and encode one image; runs in the worker processes of a build (and in-process for one worker)."""

from __future__ import annotations

import time

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


def process(item: tuple[str, str, int, int]) -> EncodedImage | str:
    """(source URL, relative path, max side, JPEG quality) -> the stored image, or the reason it is skipped."""
    source_url, rel, max_side, quality = item
    try:
        data = read_source(source_url, rel)
    except ImageError as e:
        return str(e)
    try:
        return encode_image(data, rel, max_side, quality)
    except ImageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a decoder may fail in any way on a corrupt file
        return f"undecodable image: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
