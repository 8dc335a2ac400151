"""Check, decode, resize and re-encode one image into the bytes a shard stores."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError, exception_reason
from .probe import probe

# A decompression bomb is a bad input like any other: refuse it as one image, do not crash the run.
Image.MAX_IMAGE_PIXELS = 30000 * 30000
warnings.simplefilter("error", Image.DecompressionBombWarning)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class EncodedImage:
    """What a shard stores for one image, and the facts about it that go in the sample's json."""

    data: bytes
    ext: str                  # "jpg" or "png"
    width: int
    height: int
    mode: str                 # "L" or "RGB"
    source_sha256: str        # of the source bytes: equal hashes mean the same file content
    pixel_sha256: str | None  # of the decoded pixels (None when the bytes were only validated)
    dicom: dict | None = None


def _check_complete(data: bytes, kind: str) -> None:
    """Truncated files are the commonest corruption; their end marker is missing."""
    tail = data[-1024:].rstrip(b"\x00")
    if kind == "jpg" and b"\xff\xd9" not in tail:
        raise ImageError("truncated JPEG (no end-of-image marker)")
    if kind == "png" and b"IEND" not in tail:
        raise ImageError("truncated PNG (no IEND chunk)")


def _to_storable_mode(img: Image.Image) -> Image.Image:
    """Grayscale stays 8-bit grayscale, everything else becomes RGB."""
    if img.mode == "L":
        return img
    if img.mode in ("1", "LA"):
        return img.convert("L")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High-bit-depth grayscale (16-bit PNG x-rays): stretch its own range to 8 bits, as for DICOM
        # without a window.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    if img.mode == "P":
        rgb = img.convert("RGB")
        arr = np.asarray(rgb)
        return rgb.convert("L") if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all() else rgb
    return img.convert("RGB")


def _pixel_hash(img: Image.Image) -> str:
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _resize(img: Image.Image, max_side: int) -> Image.Image:
    long_side = max(img.size)
    if max_side <= 0 or long_side <= max_side:
        return img
    scale = max_side / long_side
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode(img: Image.Image, ext: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=jpeg_quality, optimize=False)
    else:
        img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _decode(data: bytes, max_side: int) -> tuple[bool, Image.Image]:
    """(whether the stored bytes can be kept as they are, decoded image in a storable mode).

    The bytes can be kept when no resize, mode change or EXIF rotation is needed.
    """
    try:
        img = Image.open(io.BytesIO(data))
        stored_size, stored_mode = img.size, img.mode
        if max_side > 0 and img.format == "JPEG":
            # Let libjpeg decode at a reduced DCT scale that still covers the target: much faster.
            img.draft(img.mode, (max_side, max_side))
        img.load()
        rotated = img.getexif().get(0x0112, 1) != 1
        img = _to_storable_mode(ImageOps.exif_transpose(img))
        fits = max_side == 0 or max(stored_size) <= max_side
        return fits and not rotated and stored_mode == img.mode and stored_size == img.size, img
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"undecodable image: {exception_reason(e)}") from None


def _validate_only(data: bytes) -> None:
    """Copy mode with --check-decode: prove the stream decodes (at 1/8 scale for JPEG, which still
    walks every entropy-coded byte but skips most of the inverse DCT)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"undecodable image: {exception_reason(e)}") from None


def encode_image(data: bytes, name: str, max_side: int, jpeg_quality: int = 95,
                 check_decode: bool = False) -> EncodedImage:
    """Turn source bytes into stored bytes.

    max_side == 0 keeps 8-bit grayscale or RGB JPEG/PNG bytes untouched (EXIF orientation is not
    applied) after checking their headers and end marker (and, with check_decode, that the whole stream
    decodes); other modes are converted. Otherwise the image is decoded and its long side
    brought down to max_side (never up). JPEG stays JPEG, everything else is stored as lossless PNG.
    DICOM is always converted (modality and VOI LUT to 8 bits) since no training decoder reads it.
    Raises ImageError for anything that is not a usable image.
    """
    if not data:
        raise ImageError("zero-byte file")
    source_sha = hashlib.sha256(data).hexdigest()
    if data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC):
        kind = "jpg" if data.startswith(JPEG_MAGIC) else "png"
        _check_complete(data, kind)
        if max_side == 0:
            head = probe(data, kind)
            if head.mode is not None:
                if check_decode:
                    _validate_only(data)
                return EncodedImage(data, kind, head.width, head.height, head.mode, source_sha, None)
        keep_bytes, img = _decode(data, max_side)
        pixel_sha = _pixel_hash(img)
        if keep_bytes:
            return EncodedImage(data, kind, img.width, img.height, img.mode, source_sha, pixel_sha)
        out = _resize(img, max_side)
        return EncodedImage(_encode(out, kind, jpeg_quality), kind, out.width, out.height, out.mode,
                            source_sha, pixel_sha)
    from . import dicom  # pydicom costs 0.3 s to import: only where DICOM really occurs

    if dicom.is_dicom(data, name):
        img, meta = dicom.dicom_to_image(data)
        img = _to_storable_mode(img)
        out = _resize(img, max_side)
        return EncodedImage(_encode(out, "png", jpeg_quality), "png", out.width, out.height, out.mode,
                            source_sha, _pixel_hash(img), meta)
    _, img = _decode(data, max_side)  # other formats Pillow reads (BMP, TIFF, WebP): stored as PNG
    out = _resize(img, max_side)
    return EncodedImage(_encode(out, "png", jpeg_quality), "png", out.width, out.height, out.mode,
                        source_sha, _pixel_hash(img))
