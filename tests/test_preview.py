"""medssl-preview writes a labelled grid of real augmented pairs."""

import numpy as np
from PIL import Image

from medssl_scale.data.preview import main
from shardtools import REPO, run_cli


def test_preview_renders_pairs(tmp_path):
    shards = tmp_path / "shards"
    sample = REPO / "data" / "sample_cxr"
    run_cli("build", sample, shards, "--manifest", sample / "metadata.csv", "--patient-col", "patient_id",
            "--max-side", "128", "--quiet")
    out = tmp_path / "grid.png"
    assert main([str(shards), "--pairs", "5", "--size", "64", "--preset", "chest_xray", "--out", str(out)]) == 0
    grid = Image.open(out)
    tile_w, tile_h = 2 * 64 + 4 + 8, 64 + 34 + 8
    assert grid.size == (2 * tile_w, 3 * tile_h)  # 5 pairs in 2 columns -> 3 rows
    assert len(np.unique(np.asarray(grid.convert("L")))) > 50  # real image content, not blank tiles
    assert main([str(shards), "--split", "nope", "--out", str(out)]) == 2


def test_an_unwritable_out_is_one_line_before_any_shard_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file, not a folder")
    cases = {"/sys/preview.png": "cannot write in /sys", str(tmp_path / "file" / "grid.png"): "is a file, not a folder",
             str(tmp_path / "missing" / "grid.png"): "does not exist", str(tmp_path): "is a folder"}
    for out, needle in cases.items():
        # The shards do not exist either: --out is checked first, before anything is read.
        assert main([str(tmp_path / "no-shards"), "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medssl-preview: error: --out") and needle in err[0], err
