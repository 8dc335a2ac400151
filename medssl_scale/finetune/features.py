"""Frozen-encoder features of a split, computed across processes, each image exactly once, cached on disk.

Rank r embeds the r-th contiguous slice of the split's images, padded to the longest slice (padding
flagged invalid), so every rank runs the same number of batches; each batch's outputs are gathered with
their image positions and written to their positions: a padded or repeated entry can never be counted
twice, whatever `gather_for_metrics` would do on an iterable source. The encoder runs in eval mode under
no_grad: BN uses its running statistics and never updates them.

The cache key is the encoder's hash, the split's shard fingerprint and the preprocessing: a sweep of
fractions, seeds and protocols over one encoder costs one extraction.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.shardset import ShardSet
from ..distributed.sync import any_rank
from ..train.storage import atomic_torch_save
from .images import ImageRecord, LabelledImages, Preprocess, batches, rank_slice

CACHE_FORMAT = "medssl-features/1"


@dataclass
class SplitOutputs:
    """Per-image outputs of a split, in record order; `present` is False where an image could not be decoded."""

    values: np.ndarray          # (N, D) float32
    present: np.ndarray         # (N,) bool


def cache_key(encoder_hash: str, shardset: ShardSet, pre: Preprocess, arch: dict, precision: str = "fp32") -> str:
    what = {"format": CACHE_FORMAT, "encoder": encoder_hash, "shards": shardset.fingerprint, "split": shardset.split,
            "preprocess": pre.as_dict(), "arch": {k: arch.get(k) for k in ("depth", "width", "small_input")},
            "precision": precision}  # extraction runs under autocast: bf16 features are other features
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def run_over_split(accelerator, fn: Callable[[torch.Tensor], torch.Tensor], shardset: ShardSet,
                   records: list[ImageRecord], pre: Preprocess, batch_size: int, workers: int,
                   on_corrupt: str = "skip") -> SplitOutputs:
    """fn(images) -> (B, K) for every image of the split, gathered on every process, each image once."""
    order = rank_slice(len(records), accelerator.process_index, accelerator.num_processes)
    dataset = LabelledImages(shardset, records, order, pre, on_corrupt=on_corrupt)
    values, present = None, np.zeros(len(records), dtype=bool)
    for images, positions, valid in batches(dataset, batch_size, workers):
        with accelerator.autocast():
            out = fn(images.to(accelerator.device)).float()
        out = accelerator.gather(out.contiguous()).cpu()
        positions = accelerator.gather(positions.to(accelerator.device)).cpu().numpy()
        valid = accelerator.gather(valid.to(torch.uint8).to(accelerator.device)).cpu().numpy().astype(bool)
        if values is None:
            values = np.zeros((len(records), out.shape[1]), dtype=np.float32)
        values[positions[valid]] = out.numpy()[valid]
        present[positions[valid]] = True
    return SplitOutputs(values, present)


def cached_features(accelerator, backbone: torch.nn.Module, shardset: ShardSet, records: list[ImageRecord],
                    pre: Preprocess, key: str, cache_dir: str, batch_size: int, workers: int,
                    on_corrupt: str = "skip", log=print) -> SplitOutputs:
    """The split's features from the cache, or extracted (all processes) and cached by the main process."""
    path = Path(cache_dir) / f"{key}.pt"
    ids = [r.sample_id for r in records]
    blob = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}
    hit = blob.get("format") == CACHE_FORMAT and blob.get("sample_ids") == ids
    # Extraction is collective: if any process cannot read the cache (nodes without a shared disk), all extract.
    if not any_rank(not hit, accelerator.device):
        log(f"features of {shardset.split}: {len(ids)} images from the cache {path}")
        return SplitOutputs(blob["features"].numpy(), blob["present"].numpy())
    backbone.eval()
    out = run_over_split(accelerator, backbone, shardset, records, pre, batch_size, workers, on_corrupt)
    if accelerator.is_main_process:
        atomic_torch_save({"format": CACHE_FORMAT, "sample_ids": ids, "features": torch.from_numpy(out.values),
                      "present": torch.from_numpy(out.present)}, path)
    accelerator.wait_for_everyone()
    return out
