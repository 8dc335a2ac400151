"""Read an image's kind, size and channels from its headers alone, checking their structure.

Copy mode (--max-side 0) stores the bytes untouched; Pillow's pure-Python header parsing would be the
slowest step of such a build, so JPEG markers and the PNG IHDR chunk are walked here directly.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import ImageError

# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but don't.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}


@dataclass(frozen=True)
class Probe:
    kind: str      # "jpg" or "png"
    width: int
    height: int
    mode: str | None  # "L" or "RGB" when the stored bytes are usable as they are, else None


def _jpeg(data: bytes) -> Probe:
    i, n, size = 2, len(data), None
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageError("corrupt JPEG (bad marker structure)")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if length < 2 or i + 2 + length > n:
            raise ImageError("corrupt JPEG (segment runs past the end)")
        if marker in _SOF:
            if length < 8:
                raise ImageError("corrupt JPEG (short frame header)")
            height, width = struct.unpack_from(">HH", data, i + 5)
            size = (width, height, data[i + 9], data[i + 4])
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            if size is None:
                raise ImageError("corrupt JPEG (no frame header before the scan)")
            width, height, components, precision = size
            if not width or not height:
                raise ImageError("corrupt JPEG (zero width or height)")
            mode = {1: "L", 3: "RGB"}.get(components) if precision == 8 else None
            return Probe("jpg", width, height, mode)
        i += 2 + length
    raise ImageError("corrupt JPEG (no image data)")


def _png(data: bytes) -> Probe:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError("corrupt PNG (no IHDR chunk)")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise ImageError("corrupt PNG (IHDR checksum mismatch)")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if not width or not height:
        raise ImageError("corrupt PNG (zero width or height)")
    mode = {0: "L", 2: "RGB"}.get(colour) if depth == 8 else None
    return Probe("png", width, height, mode)


def probe(data: bytes, kind: str) -> Probe:
    """Probe JPEG ("jpg") or PNG ("png") bytes; ImageError names what is broken."""
    return _jpeg(data) if kind == "jpg" else _png(data)
