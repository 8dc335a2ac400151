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

from sharding.tarwriter import TarShardWriter

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
