"""Helpers for shard tests: make real image files, run the CLI, read shards back independently."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CLI = [sys.executable, "-m", "sharding.cli"]


def image_bytes(seed: int, size=(64, 48), mode="RGB", fmt="JPEG") -> bytes:
    """A real, distinct image (smooth gradient plus seeded noise) encoded as JPEG or PNG."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(1, w - 1) + yy * 255 // max(1, h - 1)) // 2
    channels = 3 if mode == "RGB" else 1
    arr = np.clip(base[..., None] + rng.integers(-40, 40, (h, w, channels)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr if channels == 3 else arr[..., 0], mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: Path, seed: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.write_bytes(image_bytes(seed, fmt=fmt, **kw))
    return path


def make_patient_tree(root: Path, patients: int, images_of=lambda p: 1 + p % 4, size=(64, 48)) -> dict:
    """root/P<id>/img<k>.jpg (every 5th patient's images are PNG grayscale); returns {patient: [relpaths]}."""
    layout = {}
    for p in range(patients):
        rels = []
        for k in range(images_of(p)):
            png = p % 5 == 0
            rel = f"P{p:04d}/img{k}.{'png' if png else 'jpg'}"
            write_image(root / rel, seed=p * 100 + k, size=size, mode="L" if png else "RGB")
            rels.append(rel)
        layout[f"P{p:04d}"] = rels
    return layout


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def run_cli(*args, check=True, env=None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"medssl-shard {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def read_samples(out: Path) -> list[dict]:
    """Every sample of every shard, read with plain tarfile: {'split','shard','key','json',members...}."""
    samples = []
    for tar_path in sorted(out.glob("*/shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            current: dict = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if current.get("key") != key:
                    current = {"key": key, "split": tar_path.parent.name, "shard": tar_path.name}
                    samples.append(current)
                data = tar.extractfile(m).read()
                current[ext] = json.loads(data) if ext == "json" else data
    return samples


def shard_hashes(out: Path) -> list[tuple[str, str]]:
    import hashlib
    return [(str(p.relative_to(out)), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.glob("*/shard-*.*"))]


def make_split_class_tree(root: Path, patients: int = 12, visits=lambda p: 1 + p % 3, size=(24, 20)) -> dict:
    """root/<split>/<class>/<patient>_v<k>.png with each patient in one split and one class folder;
    returns {relative path: {"split", "class", "patient"}} as written."""
    splits, classes = ("train", "val", "test"), ("COVID", "NORMAL", "viral")
    layout = {}
    for p in range(patients):
        split, cls = splits[p % 3] if p % 4 else "train", classes[(p // 2) % 3]
        for k in range(visits(p)):
            rel = f"{split}/{cls}/pat{p:03d}_v{k}.png"
            write_image(root / rel, seed=1000 + p * 10 + k, size=size, mode="L")
            layout[rel] = {"split": split, "class": cls, "patient": f"pat{p:03d}"}
    return layout
