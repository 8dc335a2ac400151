"""`medssl-preview`: render a PNG grid of augmented pairs, labelled, to see what the model will see."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..augment.policy import PolicyError, policy_from_config
from .reader import MODES, ShardPairSource
from .shardset import ShardSet, ShardSetError

_LABEL_HEIGHT = 34


def _to_uint8(view, mean, std) -> np.ndarray:
    """(3, H, W) normalized tensor -> (H, W, 3) uint8 image."""
    x = view.float().numpy() * np.array(std)[:, None, None] + np.array(mean)[:, None, None]
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


def render_grid(batch: dict, raw, policy, columns: int = 2) -> Image.Image:
    """One tile per pair: view 1 | view 2 over a caption with the patient id and both source keys."""
    size = policy.size
    tiles = []
    for i in range(len(raw)):
        if not raw.valid[i]:
            continue
        tile = Image.new("RGB", (2 * size + 4, size + _LABEL_HEIGHT), "white")
        tile.paste(Image.fromarray(_to_uint8(batch["view1"][i], policy.mean, policy.std)), (0, 0))
        tile.paste(Image.fromarray(_to_uint8(batch["view2"][i], policy.mean, policy.std)), (size + 4, 0))
        draw = ImageDraw.Draw(tile)
        ka, kb = (k.split("#")[-1] for k in raw.keys[i])
        draw.text((2, size + 2), f"patient {raw.patient_ids[i]}"[:60], fill="black")
        draw.text((2, size + 17), f"{ka} | {kb}"[:70], fill="gray")
        tiles.append(tile)
    if not tiles:
        raise ValueError("no valid pairs to render")
    rows = -(-len(tiles) // columns)
    tw, th = tiles[0].size
    grid = Image.new("RGB", (columns * (tw + 8), rows * (th + 8)), "white")
    for n, tile in enumerate(tiles):
        grid.paste(tile, ((n % columns) * (tw + 8), (n // columns) * (th + 8)))
    return grid


def check_out(path: str) -> str | None:
    """Why `path` cannot take the PNG (None when it can), found before any shard is read."""
    out = Path(path)
    if out.is_dir():
        return f"--out {path} is a folder: name a .png file in it"
    folder = out.parent
    if not folder.is_dir():
        if folder.exists():
            return f"--out {path}: {folder} is a file, not a folder: choose another --out"
        return f"--out {path}: the folder {folder} does not exist: create it or choose another --out"
    if out.exists() and not os.access(out, os.W_OK):
        return f"--out {path}: no permission to overwrite it: choose another --out"
    try:  # permissions, a read-only file system (/sys): only writing tells
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".medssl-preview-"):
            pass
    except OSError as e:
        return f"--out {path}: cannot write in {folder} ({e.strerror or e}): choose another --out"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="medssl-preview", description=__doc__)
    p.add_argument("shards", help="a medssl-shard build (local path or fsspec URL)")
    p.add_argument("--split", default="train")
    p.add_argument("--out", default="preview.png", help="PNG file to write [preview.png]")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--mode", choices=MODES, default="micle")
    p.add_argument("--preset", default="simclr", help="simclr, dermatology or chest_xray [simclr]")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from ..augment.torchvision_backend import TorchvisionAugmenter

    problem = check_out(a.out)
    if problem:
        print(f"medssl-preview: error: {problem}", file=sys.stderr)
        return 2
    try:
        policy = policy_from_config({"preset": a.preset, "size": a.size})
        source = ShardPairSource(ShardSet.open(a.shards, a.split), 0, 1, a.pairs, a.mode, a.seed)
    except (PolicyError, ShardSetError) as e:
        print(f"medssl-preview: error: {e}", file=sys.stderr)
        return 2
    raw = next(source.batches(a.epoch))
    grid = render_grid(TorchvisionAugmenter(policy)(raw), raw, policy)
    try:
        grid.save(a.out, format="PNG")
    except OSError as e:  # what os.access cannot see: a read-only file system (/sys), a full disk
        print(f"medssl-preview: error: cannot write --out {a.out} ({e.strerror or e}): choose another --out",
              file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {int(raw.valid.sum())} pairs from {a.shards} ({a.split}, {a.mode}, {a.preset})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
