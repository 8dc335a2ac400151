"""medssl-preview writes a labelled grid of real augmented pairs."""

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
    assert len(set(grid.convert("L").getdata())) > 50  # real image content, not blank tiles
    assert main([str(shards), "--split", "nope", "--out", str(out)]) == 2
