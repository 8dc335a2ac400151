"""DICOM sources end to end: patients from the PatientID tag, pixels windowed to 8 bits, tags kept."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from dicomgen import make_dicom
from shardtools import read_manifest, read_samples, run_cli


def test_dicom_folder_groups_by_patient_tag(tmp_path):
    src = tmp_path / "pacs"
    ramp = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 20)  # 0..3820
    files = {
        "study1/IM0001": make_dicom(ramp, "MONOCHROME2", PatientID="ANON-7", ViewPosition="PA"),
        "study1/IM0002": make_dicom(ramp, "MONOCHROME1", PatientID="ANON-7", ViewPosition="LL"),
        "study2/series/a.dcm": make_dicom(ramp, "MONOCHROME2", PatientID="ANON-9",
                                          WindowCenter=1000, WindowWidth=1000),
        "study2/series/b.dcm": make_dicom(ramp, "MONOCHROME2", PatientID=""),
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    run_cli("build", src, out, "--splits", "train=1", "--quiet")
    samples = read_samples(out)
    by_patient = {s["json"]["patient_id"]: s for s in samples}
    # Two files share PatientID ANON-7; the file with an empty tag is its own patient (its path).
    assert sorted(by_patient) == ["ANON-7", "ANON-9", "study2/series/b.dcm"]
    seven = by_patient["ANON-7"]
    assert sorted(i["dicom"]["view_position"] for i in seven["json"]["images"]) == ["LL", "PA"]
    pixels = {i["source"]: np.asarray(Image.open(io.BytesIO(seven[i["member"]]))) for i in seven["json"]["images"]}
    # No window: min..max (0..3820) -> 0..255; MONOCHROME1 is the inverse.
    expected = np.rint(ramp.astype(np.float64) * 255 / 3820).astype(np.uint8)
    assert np.array_equal(pixels["study1/IM0001"], expected)
    assert np.array_equal(pixels["study1/IM0002"], 255 - expected)
    nine = by_patient["ANON-9"]
    img = np.asarray(Image.open(io.BytesIO(nine["0.png"])))
    # Window centre 1000, width 1000: 500..1500 -> 0..255, clipped outside.
    want = np.rint(np.clip((ramp.astype(np.float64) - 500) / 1000, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(img, want)
    assert nine["json"]["images"][0]["mode"] == "L"
    assert read_manifest(out)["skipped"] == []


def test_pydicom_bundled_files_shard_or_skip_with_reason(tmp_path):
    bundled = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))
    assert len(bundled) > 50
    src = tmp_path / "bundled"
    src.mkdir()
    for p in bundled:
        (src / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    run_cli("build", src, out, "--max-side", "64", "--quiet")
    m = read_manifest(out)
    stored = sum(s["images"] for s in m["splits"].values())
    assert stored + len(m["skipped"]) == len(bundled)
    assert stored >= 40
    assert all(s["reason"].startswith(("undecodable DICOM", "not an image")) for s in m["skipped"]), m["skipped"]
    run_cli("verify", out)
