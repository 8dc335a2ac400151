"""The hand-built tar writer against the references: Python's tarfile bytes and DALI's wds2idx index."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sharding.tarwriter import TarShardWriter, pack_samples

SAMPLES = [("a-0001-000", [("json", b'{"x":1}'), ("0.jpg", os.urandom(1000)), ("1.png", os.urandom(512))]),
           ("b_2-ff-001", [("json", b"{}"), ("0.jpg", b"")]),
           ("c" * 60, [("json", os.urandom(5000))])]


def _reference_tar(samples) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o444, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_bytes_equal_python_tarfile(tmp_path):
    buf = io.BytesIO()
    w = TarShardWriter(buf)
    for key, members in SAMPLES:
        w.add_sample(key, members)
    sha, size, index = w.close()
    assert buf.getvalue() == _reference_tar(SAMPLES)
    assert size == len(buf.getvalue())
    import hashlib
    assert sha == hashlib.sha256(buf.getvalue()).hexdigest()


def test_index_equals_dali_wds2idx(tmp_path):
    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.exists():
        pytest.fail("DALI's wds2idx is missing from the venv (nvidia-dali-cuda130 not installed?)")
    tar_path = tmp_path / "s.tar"
    with open(tar_path, "wb") as f:
        w = TarShardWriter(f)
        for key, members in SAMPLES:
            w.add_sample(key, members)
        _, _, index = w.close()
    subprocess.run([str(wds2idx), str(tar_path), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert index == (tmp_path / "ref.idx").read_text()
    assert shutil.which("tar") is None or subprocess.run(["tar", "tf", str(tar_path)], capture_output=True,
                                                         check=True).stdout.decode().split() == [
        f"{k}.{e}" for k, ms in SAMPLES for e, _ in ms]


def test_keys_with_dots_are_refused():
    with pytest.raises(ValueError, match="no dots"):
        TarShardWriter(io.BytesIO()).add_sample("a.b", [("json", b"{}")])


@pytest.mark.parametrize("cuts", [(), (1,), (1, 2), (2,)])
def test_packed_blocks_concatenate_to_the_same_tar(cuts):
    """Samples packed in separate blocks (as workers do) and appended give tarfile's bytes and offsets."""
    bounds = [0, *cuts, len(SAMPLES)]
    buf = io.BytesIO()
    w = TarShardWriter(buf)
    for start, end in zip(bounds, bounds[1:]):
        w.add_packed(pack_samples(SAMPLES[start:end]))
    sha, size, index = w.close()
    reference = _reference_tar(SAMPLES)
    assert buf.getvalue() == reference and size == len(reference) and w.samples == len(SAMPLES)
    # The index offsets, independently: where tarfile finds each member's data.
    lines = {}
    with tarfile.open(fileobj=io.BytesIO(reference)) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            lines.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    assert index == f"v1.2 {len(SAMPLES)}\n" + "".join(" ".join(v) + "\n" for v in lines.values())
