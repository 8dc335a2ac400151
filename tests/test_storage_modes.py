"""Files written atomically get the mode a plain open() gives them (mkstemp's 0600 would hide a shared
feature cache or encoder from the group)."""

import os
import stat

import torch

from medssl_scale.train.storage import atomic_torch_save


def test_atomic_save_honours_the_umask(tmp_path):
    before = os.umask(0o027)
    try:
        atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "a.pt")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(before)
    mode = stat.S_IMODE((tmp_path / "a.pt").stat().st_mode)
    assert mode == 0o640 == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.zeros(2))
