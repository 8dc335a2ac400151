"""Every labelled image of a split, as records, and the Dataset that decodes and preprocesses them.

Pretraining reads patient bags as pairs; evaluation needs each image once, with its patient and labels.
The records come from the samples' json members (one small range read each); an image is identified
by its sample id `<shard path>#<key>.<member>`, the same on every rank and in every run.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..augment.policy import ViewPolicy, draw_view
from ..augment.torchvision_backend import apply_view, decode_rgb, normalize
from ..augment.torchvision_loader import signal_safe_batches
from ..data.batch import CorruptImage
from ..data.fetch import RangeFetcher
from ..data.reader import mix_seed
from ..data.shardset import ShardSet


@dataclass(frozen=True)
class ImageRecord:
    sample_id: str
    patient_id: str
    source: str
    labels: dict                 # the shard's label strings, by column
    shard: int
    offset: int
    size: int


def read_records(shardset: ShardSet, batch: int = 512) -> list[ImageRecord]:
    """Every image of the split, in shard order, from its samples' json members."""
    fetcher, records = RangeFetcher(shardset), []
    samples = shardset.samples
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        metas = fetcher.fetch([(s.shard, s.json[0], s.json[0] + s.json[1]) for s in chunk])
        for sample, raw in zip(chunk, metas):
            meta = json.loads(raw)
            members = {m["member"]: m for m in meta["images"]}
            for ext, offset, size in sample.images:
                info = members.get(ext, {})
                records.append(ImageRecord(f"{shardset.shards[sample.shard].path}#{sample.key}.{ext}",
                                           str(meta["patient_id"]), info.get("source", ""),
                                           info.get("labels") or {}, sample.shard, offset, size))
    fetcher.close()
    return records


@dataclass(frozen=True)
class Preprocess:
    """Deterministic evaluation preprocessing: short side to size / crop_fraction, center crop, normalize."""

    size: int
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"size": self.size, "crop_fraction": self.crop_fraction, "mean": list(self.mean),
                "std": list(self.std)}

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = F.to_dtype(img, torch.float32, scale=True)
        x = F.resize(x, [max(self.size, int(math.floor(self.size / self.crop_fraction + 0.5)))],
                     interpolation=InterpolationMode.BILINEAR, antialias=True)
        return normalize(F.center_crop(x, [self.size, self.size]), self.mean, self.std)


FINETUNE_VIEW = ViewPolicy(crop_scale=(0.25, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


class LabelledImages(torch.utils.data.Dataset):
    """Item i: (image tensor, position i, valid flag). Positions index `records`.

    `order` lists the positions this process reads (-1: padding, reads position 0 and is marked invalid).
    With `view` set, images are augmented (fine-tuning) from the seed (seed, epoch, position): the same
    image gets the same crop whatever the rank, worker or resume point.
    """

    def __init__(self, shardset: ShardSet, records: list[ImageRecord], order: np.ndarray, pre: Preprocess,
                 view: ViewPolicy | None = None, seed: int = 0, epoch: int = 0, on_corrupt: str = "skip"):
        self.shardset, self.records, self.order, self.pre = shardset, records, np.asarray(order), pre
        self.view, self.seed, self.epoch, self.on_corrupt = view, seed, epoch, on_corrupt
        self._fetcher = RangeFetcher(shardset)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        pos = int(self.order[i])
        valid = pos >= 0
        rec = self.records[max(pos, 0)]
        try:
            img = decode_rgb(self._fetcher.fetch([(rec.shard, rec.offset, rec.offset + rec.size)])[0])
        except CorruptImage as e:
            if self.on_corrupt == "error":
                raise CorruptImage(f"{rec.sample_id} ({rec.source}): {e}") from None
            img, valid = torch.zeros(3, self.pre.size, self.pre.size, dtype=torch.uint8), False
        if self.view is None:
            x = self.pre(img)
        else:
            rng = random.Random(mix_seed(self.seed, self.epoch, max(pos, 0), 3))
            p = draw_view(img.shape[-2], img.shape[-1], self.view, rng)
            x = normalize(apply_view(img, p, self.view, self.pre.size), self.pre.mean, self.pre.std)
        return x, max(pos, 0), valid


def rank_slice(n: int, rank: int, world: int) -> np.ndarray:
    """Positions 0..n-1 split in contiguous, balanced slices; shorter slices padded with -1 to equal length."""
    per = math.ceil(n / world)
    start = rank * (n // world) + min(rank, n % world)
    mine = np.arange(start, start + n // world + (1 if rank < n % world else 0))
    return np.concatenate([mine, -np.ones(per - len(mine), dtype=np.int64)]).astype(np.int64)


def batches(dataset: LabelledImages, batch_size: int, workers: int):
    """(images, positions, valid) batches in order; loader workers leave signals to this process."""
    return signal_safe_batches(dataset, batch_size, workers)
