"""Tests for sharding.dicom: DICOM bytes -> 8-bit PIL image + header metadata."""

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from sharding.dicom import dicom_to_image, is_dicom, read_dicom_header
from sharding.errors import ImageError

from dicomgen import STUDY_UID, make_dicom

# Raw stored values of the 16-bit test image, chosen to hit both clip ends and the window middle.
RAW16 = np.array(
    [[0, 432, 482, 532, 582], [632, 700, 1012, 4095, 65535], [400, 450, 500, 550, 600], [10, 20, 30, 40, 50]],
    dtype=np.uint16,
)
# Modality: HU = 2 * raw - 1024; window (first of two) center 40, width 400 -> HU -160..240 maps to 0..255.
CT_TAGS = dict(RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[40, 300], WindowWidth=[400, 1500])


def expected_ct():
    hu = RAW16.astype(np.float64) * 2 - 1024
    return np.rint(np.clip((hu - (-160.0)) / 400.0 * 255.0, 0, 255)).astype(np.uint8)


def test_monochrome2_rescale_and_window():
    image, meta = dicom_to_image(make_dicom(RAW16, "MONOCHROME2", **CT_TAGS))
    assert image.mode == "L" and image.size == (5, 4)
    out = np.asarray(image)
    np.testing.assert_array_equal(out, expected_ct())
    # Spot values worked out by hand: raw 0 -> HU -1024 (clipped low), raw 432 -> HU -160 (window bottom),
    # raw 482 -> HU -60 -> 100/400*255 = 63.75 -> 64, raw 532 -> HU 40 -> 127.5 -> 128 (round half even),
    # raw 632 -> HU 240 (window top), raw 1012 -> HU 1000 (clipped high).
    assert out[0].tolist() == [0, 0, 64, 128, 191]
    assert out[1, 0] == 255 and out[1, 2] == 255 and out[1, 4] == 255
    assert meta["window"] == [40.0, 400.0]
    assert meta["frames"] == 1
    assert meta["photometric_interpretation"] == "MONOCHROME2"
    json.dumps(meta)


def test_monochrome1_is_inverted_after_windowing():
    image, meta = dicom_to_image(make_dicom(RAW16, "MONOCHROME1", **CT_TAGS))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), 255 - expected_ct())
    assert np.asarray(image)[0, 0] == 255  # lowest attenuation is dark in MONOCHROME2, so bright here
    assert meta["window"] == [40.0, 400.0]


def test_16bit_without_window_uses_min_max():
    raw = np.array([[100, 350, 600], [850, 1100, 225]], dtype=np.uint16)
    image, meta = dicom_to_image(make_dicom(raw, "MONOCHROME2"))
    # (raw - 100) / 1000 * 255: 0, 63.75, 127.5, 191.25, 255, 31.875
    assert np.asarray(image).tolist() == [[0, 64, 128], [191, 255, 32]]
    assert meta["window"] is None


def test_constant_image_maps_to_zero():
    image, _ = dicom_to_image(make_dicom(np.full((3, 4), 777, dtype=np.uint16), "MONOCHROME2"))
    assert image.size == (4, 3)
    assert not np.asarray(image).any()


def test_8bit_rgb_passes_through_exactly():
    raw = np.random.default_rng(0).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    image, meta = dicom_to_image(make_dicom(raw, "RGB", bits=8))
    assert image.mode == "RGB" and image.size == (7, 6)
    np.testing.assert_array_equal(np.asarray(image), raw)
    assert meta["window"] is None


def test_multiframe_takes_first_frame_and_counts_frames():
    raw = np.stack([np.arange(12, dtype=np.uint8).reshape(3, 4) + 10 * k for k in range(3)])
    image, meta = dicom_to_image(make_dicom(raw, "MONOCHROME2", bits=8, frames=3))
    assert image.size == (4, 3)
    # frame 0 holds 0..11, so min-max gives rint(v * 255 / 11)
    expected = np.rint(np.arange(12) * 255.0 / 11).reshape(3, 4)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert meta["frames"] == 3
    assert meta["number_of_frames"] == 3


def test_voi_lut_sequence():
    lut = Dataset()
    lut.LUTDescriptor = [4, 100, 16]  # 4 entries, first input value 100, 16-bit entries
    lut.LUTData = np.array([0, 1000, 2000, 4000], dtype="<u2").tobytes()  # written as OW, as scanners do
    raw = np.array([[90, 100, 101], [102, 103, 200]], dtype=np.uint16)
    image, meta = dicom_to_image(make_dicom(raw, "MONOCHROME2", VOILUTSequence=[lut]))
    # inputs clamp to the table ends -> 0, 0, 1000, 2000, 4000, 4000; the table's range 0..4000 maps to 0..255
    assert np.asarray(image).tolist() == [[0, 0, 64], [128, 255, 255]]
    assert meta["window"] is None


@pytest.mark.parametrize("file_meta", [True, False])
def test_file_without_preamble(file_meta):
    raw = np.array([[0, 50], [100, 200]], dtype=np.uint8)
    data = make_dicom(raw, "MONOCHROME2", bits=8, preamble=False, file_meta=file_meta)
    assert data[128:132] != b"DICM"
    assert is_dicom(data, "scan.dcm") and is_dicom(data, "SCAN.DICOM")
    assert not is_dicom(data, "scan.png") and not is_dicom(data)
    image, meta = dicom_to_image(data)
    assert np.asarray(image).tolist() == [[0, 64], [128, 255]]  # 50/200*255 = 63.75, 100/200*255 = 127.5
    assert meta["patient_id"] == "PAT-001"


def test_header_fields():
    data = make_dicom(
        RAW16,
        "MONOCHROME2",
        ViewPosition="PA ",
        ImageLaterality="L",
        StudyDate="20240131",
        PatientName="Doe^Jane",
    )
    assert is_dicom(data) and is_dicom(data, "x.bin")
    for source in (data, io.BytesIO(data)):
        header = read_dicom_header(source)
        assert header["patient_id"] == "PAT-001"
        assert header["study_instance_uid"] == STUDY_UID
        assert header["series_instance_uid"] == STUDY_UID + ".2"
        assert header["view_position"] == "PA"
        assert header["laterality"] == "L"
        assert header["study_date"] == "20240131"
        assert header["modality"] == "CR"
        assert (header["rows"], header["columns"], header["bits_stored"]) == (4, 5, 16)
        assert "body_part_examined" not in header and "number_of_frames" not in header
        assert "patient_name" not in header  # not a kept tag
        assert type(header["study_instance_uid"]) is str
        json.dumps(header)


def test_truncated_pixel_data():
    data = make_dicom(np.arange(256, dtype=np.uint16).reshape(16, 16), "MONOCHROME2")
    cut = data[:-100]  # pixel data is the last element, so this cuts inside it
    assert read_dicom_header(cut)["patient_id"] == "PAT-001"  # header still readable
    with pytest.raises(ImageError, match="^undecodable DICOM: "):
        dicom_to_image(cut)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        b"not a dicom file\n" * 50,
        b"\x00" * 128 + b"DICM" + b"\xff" * 64,
    ],
    ids=["empty", "random", "text", "magic-then-garbage"],
)
def test_bad_input_raises_image_error(data):
    with pytest.raises(ImageError, match="^undecodable DICOM: "):
        dicom_to_image(data)
    with pytest.raises(ImageError, match="^undecodable DICOM: "):
        read_dicom_header(data)


def test_is_dicom_rejects_non_dicom():
    rand = np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    assert not is_dicom(b"", "a.dcm")
    assert not is_dicom(rand, "a.dcm")
    assert not is_dicom(b"hello" * 100, "a.dicom")
    assert is_dicom(b"\x00" * 128 + b"DICM")


def _bundled_files():
    # The files get_testdata_files("*.dcm") finds offline (78 in pydicom 3.0). Globbing the bundled folder
    # directly because get_testdata_files also tries to download extra test files: ~11 s of network
    # timeouts offline, and a different file set wherever downloads succeed.
    return sorted(str(p) for p in (Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm"))


def test_bundled_files_decode_or_raise_image_error():
    files = _bundled_files()
    assert len(files) > 50
    decoded, refused = [], {}
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            image, meta = dicom_to_image(data)
        except ImageError as exc:
            reason = str(exc)
            assert reason.startswith("undecodable DICOM: ") and "\n" not in reason and len(reason) <= 140
            refused[path.rsplit("/", 1)[-1]] = reason
            continue
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        assert image.mode in ("L", "RGB")
        assert image.size == (ds.Columns, ds.Rows)
        assert meta["frames"] >= 1
        json.dumps(meta)
        decoded.append(path)
    print(f"\nbundled DICOMs: {len(decoded)} decoded, {len(refused)} refused")
    for name, reason in sorted(refused.items()):
        print(f"  {name}: {reason}")
    assert len(decoded) >= 40


def _bundled(name):
    return open(pydicom.data.get_testdata_file(name), "rb").read()


def test_bundled_colour_conversions():
    # The YBR_FULL JPEG and the lossless RLE file hold the same picture: if YCbCr were not converted
    # to RGB the two would differ wildly, lossy JPEG keeps them within a few grey levels.
    ybr, _ = dicom_to_image(_bundled("SC_rgb_dcmtk_+eb+cy+n1.dcm"))
    ref, _ = dicom_to_image(_bundled("SC_rgb_rle.dcm"))
    assert ybr.mode == ref.mode == "RGB"
    diff = np.abs(np.asarray(ybr, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert diff.mean() < 5
    # 16-bit RGB of the same picture scales to the 8-bit one.
    ref16, _ = dicom_to_image(_bundled("SC_rgb_rle_16bit.dcm"))
    assert np.abs(np.asarray(ref16, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1
    palette, meta = dicom_to_image(_bundled("examples_palette.dcm"))
    assert palette.mode == "RGB" and palette.size == (800, 350)
    assert meta["photometric_interpretation"] == "PALETTE COLOR"


def test_bundled_mr_uses_file_window():
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    image, meta = dicom_to_image(_bundled("MR_small.dcm"))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert meta["window"] == [center, width]
    expected = np.rint(np.clip((ds.pixel_array.astype(np.float64) - (center - width / 2)) / width * 255, 0, 255))
    np.testing.assert_array_equal(np.asarray(image), expected)
