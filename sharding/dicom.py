"""Turn DICOM bytes into an 8-bit PIL image plus a small JSON-able dict of header metadata."""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any, BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, convert_color_space, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sharding.errors import ImageError, strip_addresses

# A malformed file's problem is reported once, as the image's skip reason; pydicom's own per-file
# warnings and log lines would only bury the build's progress and summary.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
logging.getLogger("pydicom").setLevel(logging.ERROR)

# (DICOM keyword, meta key); values are stripped strings or ints, and absent/empty ones are omitted.
_KEPT_TAGS = (
    ("PatientID", "patient_id"),
    ("StudyInstanceUID", "study_instance_uid"),
    ("SeriesInstanceUID", "series_instance_uid"),
    ("SOPInstanceUID", "sop_instance_uid"),
    ("StudyDate", "study_date"),
    ("Modality", "modality"),
    ("ViewPosition", "view_position"),
    ("BodyPartExamined", "body_part_examined"),
    # Laterality is series-level; ImageLaterality (image-level) wins when both are present.
    ("Laterality", "laterality"),
    ("ImageLaterality", "laterality"),
    ("PhotometricInterpretation", "photometric_interpretation"),
    ("Rows", "rows"),
    ("Columns", "columns"),
    ("BitsStored", "bits_stored"),
    ("NumberOfFrames", "number_of_frames"),
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Groups every real image object has elements in; used to tell a forced, preamble-less parse of a
# real dataset from garbage, which pydicom's force=True "parses" as one element with a random tag.
_DICOM_GROUPS = (0x0008, 0x0010, 0x0020, 0x0028)
_MAX_REASON = 120


def is_dicom(data: bytes, name: str = "") -> bool:
    """True for the 'DICM' magic at offset 128, or for a *.dcm/*.dicom file that parses without preamble."""
    if data[128:132] == b"DICM":
        return True
    if not name.lower().endswith((".dcm", ".dicom")):
        return False
    try:
        _read(io.BytesIO(data), stop_before_pixels=True)
    except ImageError:
        return False
    return True


def read_dicom_header(fileobj_or_bytes: bytes | bytearray | memoryview | BinaryIO) -> dict[str, Any]:
    """Return the kept header tags (snake_case keys) without reading pixel data; ImageError if unparseable."""
    if isinstance(fileobj_or_bytes, (bytes, bytearray, memoryview)):
        fileobj_or_bytes = io.BytesIO(fileobj_or_bytes)
    return _header(_read(fileobj_or_bytes, stop_before_pixels=True))


def dicom_to_image(data: bytes) -> tuple[Image.Image, dict[str, Any]]:
    """Decode the first frame to an 8-bit "L" or "RGB" image; meta is the header plus `frames` and `window`.

    Grayscale: modality LUT/rescale, then window (or VOI LUT) mapped to 0..255, else min..max to 0..255;
    MONOCHROME1 is inverted last. Any decoding failure raises ImageError("undecodable DICOM: ...").
    """
    ds = _read(io.BytesIO(data), stop_before_pixels=False)
    meta = _header(ds)
    try:
        arr, props, frames = _decode_first_frame(ds)
        pi = str(props.get("photometric_interpretation", ""))
        window = None
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            out, window = _gray_to_uint8(arr, ds)
            if pi == "MONOCHROME1":
                out = 255 - out  # after windowing, so high attenuation is bright as in MONOCHROME2
        else:
            out = _colour_to_uint8(arr, ds, pi, int(props.get("bits_stored") or 8))
        image = Image.fromarray(np.ascontiguousarray(out))
    except ImageError:
        raise
    except Exception as exc:  # pydicom/numpy raise many types for bad input; callers only handle ImageError
        raise ImageError(f"undecodable DICOM: {_reason(exc)}") from exc
    meta["frames"] = frames
    meta["window"] = window
    return image, meta


def _read(fileobj: BinaryIO, stop_before_pixels: bool) -> pydicom.Dataset:
    # force=True so preamble-less files parse too; garbage then "parses", hence the plausibility check.
    try:
        ds = pydicom.dcmread(fileobj, force=True, stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise ImageError(f"undecodable DICOM: {_reason(exc)}") from exc
    has_ts = "TransferSyntaxUID" in getattr(ds, "file_meta", {})
    if not has_ts and not any(tag.group in _DICOM_GROUPS for tag in ds.keys()):
        raise ImageError("undecodable DICOM: no DICOM data elements found")
    return ds


def _header(ds: pydicom.Dataset) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for keyword, key in _KEPT_TAGS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed value (e.g. IS '1A') should not lose the rest of the header
            continue
        if value is None or value == "":
            continue
        if isinstance(value, int):  # US/IS values; IS subclasses int
            meta[key] = int(value)
        elif isinstance(value, (list, MultiValue)):
            meta[key] = "\\".join(str(v).strip() for v in value)
        else:
            text = str(value).strip()
            if text:
                meta[key] = text
    return meta


def _decode_first_frame(ds: pydicom.Dataset) -> tuple[np.ndarray, dict[str, Any], int]:
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ImageError("undecodable DICOM: no pixel data")
    file_meta = ds.file_meta
    if "TransferSyntaxUID" not in file_meta:
        # Files without file meta (e.g. ACR-NEMA style): use the encoding pydicom detected while reading.
        implicit, little = ds.original_encoding
        file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    tsyntax = file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageError(f"undecodable DICOM: unsupported transfer syntax {tsyntax.name}") from None
    if not decoder.is_available:
        raise ImageError(f"undecodable DICOM: no decoder installed for {tsyntax.name}")
    opts = as_pixel_options(ds)
    # raw=False: pydicom converts YBR_FULL/YBR_FULL_422 to RGB and reports the result in props.
    arr, props = decoder.as_array(ds, index=0, raw=False, **opts)
    return arr, props, int(opts["number_of_frames"])


def _gray_to_uint8(arr: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, list[float] | None]:
    if arr.ndim != 2:
        raise ImageError(f"undecodable DICOM: grayscale pixel array has shape {arr.shape}")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageError("undecodable DICOM: non-finite pixel values")
    window = _window(ds)
    if window is not None:
        center, width = window
        lo = center - width / 2
        scaled = (values - lo) / width * 255.0
    elif ds.get("VOILUTSequence"):
        scaled = _apply_voi_lut(values, ds)
    else:
        lo, hi = values.min(), values.max()
        scaled = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8), window


def _window(ds: pydicom.Dataset) -> list[float] | None:
    # The first window when several are given; an unusable one falls back to min-max rather than failing.
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if isinstance(center, MultiValue):
            center = center[0]
        if isinstance(width, MultiValue):
            width = width[0]
        center, width = float(center), float(width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (np.isfinite(center) and np.isfinite(width) and width > 0):
        return None
    return [center, width]


def _apply_voi_lut(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    # Build the whole table through pydicom (it decodes US/OW LUT data), then index it ourselves:
    # inputs outside the table clamp to its ends, and the table's own output range maps to 0..255
    # (the descriptor's bit depth is often larger than the values actually used).
    n_entries, first_map = ds.VOILUTSequence[0].LUTDescriptor[:2]
    n_entries = n_entries or 65536
    table = apply_voi(np.arange(first_map, first_map + n_entries, dtype=np.int64), ds).astype(np.float64)
    index = np.clip(np.rint(values) - first_map, 0, n_entries - 1).astype(np.int64)
    lo, hi = table.min(), table.max()
    if hi <= lo:
        return np.zeros_like(values)
    return (table[index] - lo) / (hi - lo) * 255.0


def _colour_to_uint8(arr: np.ndarray, ds: pydicom.Dataset, pi: str, bits_stored: int) -> np.ndarray:
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)[..., :3]  # drop alpha from enhanced palettes
        max_value = 255 if arr.dtype == np.uint8 else 65535
    elif pi.startswith("YBR_FULL"):
        arr = convert_color_space(arr, pi, "RGB")  # normally already done by the decoder (raw=False)
        max_value = 2**bits_stored - 1
    elif pi == "RGB":
        max_value = 2**bits_stored - 1
    else:
        raise ImageError(f"undecodable DICOM: unsupported photometric interpretation {pi!r}")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"undecodable DICOM: colour pixel array has shape {arr.shape}")
    if arr.dtype == np.uint8 and max_value == 255:
        return arr  # exact pass-through for ordinary 8-bit colour
    scaled = arr.astype(np.float64) * (255.0 / max_value)
    return np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)


def _reason(exc: BaseException) -> str:
    # One line, short: pydicom's plugin errors are multi-line with a generic first line.
    text = strip_addresses(" ".join(str(exc).split())) or type(exc).__name__
    marker = "raised by all available plugins:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."
