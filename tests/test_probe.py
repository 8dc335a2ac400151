"""Header probing against Pillow as the reference, and copy mode's checks on broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sharding.errors import ImageError
from sharding.images import encode_image
from sharding.probe import probe
from shardtools import SHARED_DATA, image_bytes


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _generated():
    rgb = Image.open(io.BytesIO(image_bytes(1, size=(37, 23))))
    yield "rgb-jpeg", _encode(rgb, "JPEG"), "RGB"
    yield "progressive", _encode(rgb, "JPEG", progressive=True), "RGB"
    yield "gray-jpeg", _encode(rgb.convert("L"), "JPEG"), "L"
    yield "cmyk-jpeg", _encode(rgb.convert("CMYK"), "JPEG"), None
    yield "rgb-png", _encode(rgb, "PNG"), "RGB"
    yield "gray-png", _encode(rgb.convert("L"), "PNG"), "L"
    yield "rgba-png", _encode(rgb.convert("RGBA"), "PNG"), None
    yield "palette-png", _encode(rgb.convert("P"), "PNG"), None
    yield "16bit-png", _encode(Image.fromarray(np.arange(37 * 23, dtype=np.uint16).reshape(23, 37) * 50), "PNG"), None


@pytest.mark.parametrize("name,data,mode", list(_generated()), ids=[g[0] for g in _generated()])
def test_probe_matches_pillow(name, data, mode):
    kind = "png" if data.startswith(b"\x89PNG") else "jpg"
    head = probe(data, kind)
    ref = Image.open(io.BytesIO(data))
    assert (head.width, head.height) == ref.size
    assert head.mode == mode


def test_probe_matches_pillow_on_real_xrays():
    images = sorted((SHARED_DATA / "covid_cxr" / "images").glob("*.jpg"))[:200]
    if not images:
        pytest.skip("../shared/data/covid_cxr is absent")
    for path in images:
        data = path.read_bytes()
        head, ref = probe(data, "jpg"), Image.open(io.BytesIO(data))
        assert (head.width, head.height) == ref.size, path
        assert head.mode == (ref.mode if ref.mode in ("L", "RGB") else None), path


@pytest.mark.parametrize("cut", [3, 30, 200])
def test_probe_refuses_broken_headers(cut):
    data = image_bytes(2, size=(64, 64))
    with pytest.raises(ImageError, match="corrupt JPEG"):
        probe(data[:cut], "jpg")
    png = image_bytes(2, size=(64, 64), fmt="PNG")
    broken = png[:20] + bytes([png[20] ^ 1]) + png[21:]
    with pytest.raises(ImageError, match="IHDR checksum"):
        probe(broken, "png")


def test_copy_mode_keeps_bytes_and_check_decode_catches_entropy_damage():
    data = bytearray(image_bytes(3, size=(256, 256)))
    sos = data.index(b"\xff\xda")
    data[sos + 60:sos + 62] = b"\xff\xc4"  # a table marker inside the scan: headers and end stay intact
    data = bytes(data)
    kept = encode_image(data, "x.jpg", max_side=0)
    assert kept.data == data and (kept.width, kept.height, kept.mode) == (256, 256, "RGB")
    with pytest.raises(ImageError, match="undecodable"):
        encode_image(data, "x.jpg", max_side=0, check_decode=True)
