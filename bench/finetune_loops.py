"""The evaluation job's loops against plain torch loops on the same model and images (used by bench/finetune.py).

extract_ratio_vs_loop   images/s of the job's feature extraction (features.run_over_split: shard range reads,
                        decode, resize + center crop, rank slices, gather by position) over a plain loop: a
                        torch Dataset of the same image bytes held in memory, the same decode and transforms,
                        DataLoader with the same workers and batch, eval-mode forward under no_grad.
finetune_ratio_vs_loop  images/s of one fine-tune epoch (train_loop.FineTuner.train_epoch: seeded
                        augmentation, Accelerate backward, schedule) over a plain loop: the same Classifier,
                        AdamW, random-resized-crop + flip from torchvision.transforms.v2, cross-entropy.
Both sides alternate over several rounds; medians are reported. Shards are built from the HAM10000 copy.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medssl_scale.augment.torchvision_backend import decode_rgb  # noqa: E402
from medssl_scale.finetune.config import load_eval_config  # noqa: E402

SIZE, BATCH, WORKERS, N_IMAGES = 64, 64, 2, 1024


def build_shards(data: Path, out: Path, n_images: int = N_IMAGES) -> Path:
    """The first n_images rows of HAM10000 as labelled 64 px shards (all in split train, plus tiny val/test)."""
    if (out / "manifest.json").exists():
        return out
    with open(data / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n_images]
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / "bench-subset.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    subprocess.run([str(Path(sys.executable).parent / "medssl-shard"), "build", str(data), str(out), "--manifest",
                    str(manifest), "--patient-col", "lesion_id", "--label-cols", "dx", "--splits",
                    "train=0.9,val=0.05,test=0.05", "--max-side", str(SIZE), "--quiet"], check=True)
    return out


def _setup(shards: Path, protocol: str):
    from medssl_scale.finetune.encoder import load_encoder_for_eval
    from medssl_scale.finetune.job import make_accelerator
    from medssl_scale.finetune.splits import build_sets

    cfg = load_eval_config(str(REPO / "configs/ham_finetune.yaml"), [
        f"data.shards={shards}", f"run_dir={tempfile.mkdtemp(prefix='bench-ft-')}", "model.depth=18",
        "model.small_input=false", f"preprocess.size={SIZE}", f"data.batch_size={BATCH}",
        f"data.workers={WORKERS}", f"finetune.batch_size={BATCH}", f"protocol={protocol}", "finetune.epochs=1",
        "finetune.warmup_epochs=0"])
    sets = build_sets(cfg)
    enc = load_encoder_for_eval(cfg)
    return cfg, sets, enc, make_accelerator(cfg)


class _InMemory(torch.utils.data.Dataset):
    def __init__(self, blobs: list[bytes], labels: np.ndarray, transform):
        self.blobs, self.labels, self.transform = blobs, labels, transform

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i):
        return self.transform(decode_rgb(self.blobs[i])), int(self.labels[i])


def _blobs(sets) -> list[bytes]:
    from medssl_scale.data.fetch import RangeFetcher

    s = sets.train
    recs = [s.records[i] for i in s.index]
    return RangeFetcher(s.shardset).fetch([(r.shard, r.offset, r.offset + r.size) for r in recs])


def _plain_eval_transform(pre):
    return v2.Compose([v2.ToDtype(torch.float32, scale=True),
                       v2.Resize(int(pre.size / pre.crop_fraction + 0.5), antialias=True),
                       v2.CenterCrop(pre.size), v2.Normalize(list(pre.mean), list(pre.std))])


def measure_extract(shards: Path, rounds: int) -> dict:
    from medssl_scale.finetune.features import run_over_split

    cfg, sets, enc, acc = _setup(shards, "linear")
    model = enc.backbone.eval()
    s = sets.train
    recs = [s.records[i] for i in s.index]
    plain = torch.utils.data.DataLoader(_InMemory(_blobs(sets), s.labels, _plain_eval_transform(enc.preprocess)),
                                        batch_size=BATCH, num_workers=WORKERS)

    def ours() -> float:
        t = time.perf_counter()
        run_over_split(acc, model, s.shardset, recs, enc.preprocess, BATCH, WORKERS)
        return len(recs) / (time.perf_counter() - t)

    @torch.no_grad()
    def loop() -> float:
        t = time.perf_counter()
        for x, _ in plain:
            model(x)
        return len(recs) / (time.perf_counter() - t)

    ours(), loop()  # warm-up: page cache, worker start-up code paths
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(loop())
    return {"extract_images": len(recs), "extract_ours_img_s": round(statistics.median(a), 1),
            "extract_loop_img_s": round(statistics.median(b), 1),
            "extract_ratio_vs_loop": round(statistics.median(a) / statistics.median(b), 3)}


def measure_finetune(shards: Path, rounds: int) -> dict:
    from medssl_scale.finetune.classifier import Classifier
    from medssl_scale.finetune.train_loop import FineTuner

    cfg, sets, enc, acc = _setup(shards, "finetune")
    names = sets.spec.names
    tuner = FineTuner(cfg, acc, Classifier(enc.backbone, len(names)), sets.train, sets.val, "multiclass", names,
                      enc.preprocess, Path(cfg.run_dir), cfg.content_hash(), log=lambda *_: None)
    n = tuner.steps_per_epoch * tuner.batch
    view = tuner.view
    pre = enc.preprocess
    transform = v2.Compose([v2.RandomResizedCrop(pre.size, scale=view.crop_scale, ratio=view.crop_ratio,
                                                 antialias=True),
                            v2.RandomHorizontalFlip(view.flip_p),
                            v2.RandomRotation(view.rotate_deg, interpolation=v2.InterpolationMode.BILINEAR),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))])
    plain_model = Classifier(load_encoder_for_bench(cfg), len(names))
    opt = torch.optim.AdamW(plain_model.parameters(), lr=cfg.finetune.lr, weight_decay=cfg.finetune.weight_decay)
    plain = torch.utils.data.DataLoader(_InMemory(_blobs(sets), sets.train.labels, transform), batch_size=BATCH,
                                        shuffle=True, drop_last=True, num_workers=WORKERS)

    def ours() -> float:
        tuner.state.epoch, tuner.state.step = 0, 0
        t = time.perf_counter()
        tuner.train_epoch()
        return n / (time.perf_counter() - t)

    def loop() -> float:
        plain_model.train()
        t, seen = time.perf_counter(), 0
        for x, y in plain:
            loss = torch.nn.functional.cross_entropy(plain_model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y)
        return seen / (time.perf_counter() - t)

    ours(), loop()
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(loop())
    return {"finetune_images_per_epoch": n, "finetune_ours_img_s": round(statistics.median(a), 1),
            "finetune_loop_img_s": round(statistics.median(b), 1),
            "finetune_ratio_vs_loop": round(statistics.median(a) / statistics.median(b), 3)}


def load_encoder_for_bench(cfg):
    from medssl_scale.finetune.encoder import load_encoder_for_eval
    return load_encoder_for_eval(cfg).backbone
