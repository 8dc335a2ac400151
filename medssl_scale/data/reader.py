"""One rank's pairs of a shard set, epoch by epoch: balanced, exactly-once, resumable, MICLe or SimCLR.

Each epoch is a seeded permutation of every sample of the split. Rank r of R takes the r-th of R
contiguous slices of it (sizes differ by at most one), cuts it into batches, and pads the last batch
with invalid entries so that every rank runs the same number of steps with tensors of the same
shape: no collective ever waits on a rank that ran out, and no sample is seen twice or dropped.
The position in an epoch is just (epoch, step), so a resumed run continues with the very next batch.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Iterator

import numpy as np

from .batch import RawPairBatch, padding_like
from .fetch import RangeFetcher
from .shardset import Sample, ShardSet

MODES = ("micle", "simclr")


def patient_index(patient_id: str) -> int:
    """A stable 63-bit integer for a patient id, equal on every rank (collisions ~1e-9 at 1e5 patients)."""
    return int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") >> 1


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (seed, epoch, sample ...), independent of rank and worker layout."""
    return int.from_bytes(hashlib.blake2b(np.array(parts, dtype=np.int64).tobytes(), digest_size=8).digest(), "big")


def choose_images(n: int, mode: str, rng: np.random.Generator) -> tuple[int, int]:
    """Indices of the two images of a bag of n that make the pair.

    MICLe: two different images when the bag has two or more, else the one image twice (then the pair
    is two views of it, as in SimCLR). SimCLR: one image, used for both views.
    """
    if mode == "micle" and n >= 2:
        a, b = rng.choice(n, size=2, replace=False)
        return int(a), int(b)
    a = int(rng.integers(n))
    return a, a


class ShardPairSource:
    """The PairSource of one rank (see medssl_scale.data.batch)."""

    def __init__(self, shardset: ShardSet, rank: int, world_size: int, batch_size: int, mode: str = "micle",
                 seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"pair mode {mode!r}: use one of {MODES}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.shardset, self.rank, self.world_size = shardset, rank, world_size
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        self._fetcher = RangeFetcher(shardset)

    def steps_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.shardset) / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    def rank_samples(self, epoch: int) -> np.ndarray:
        """Global sample numbers this rank sees in `epoch`, in order (before padding)."""
        n, r, w = len(self.shardset), self.rank, self.world_size
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        start = r * (n // w) + min(r, n % w)
        return order[start:start + n // w + (1 if r < n % w else 0)]

    def batches(self, epoch: int, start_step: int = 0, worker: int = 0,
                num_workers: int = 1) -> Iterator[RawPairBatch]:
        mine = self.rank_samples(epoch)
        for step in range(start_step + worker, self.steps_per_epoch(), num_workers):
            yield self._batch(epoch, step, mine[step * self.batch_size:(step + 1) * self.batch_size])

    def _batch(self, epoch: int, step: int, numbers: np.ndarray) -> RawPairBatch:
        samples = [self.shardset.samples[i] for i in numbers]
        picks, ranges = [], []
        for number, sample in zip(numbers, samples):
            rng = np.random.default_rng(mix_seed(self.seed, epoch, int(number), 1))
            a, b = choose_images(len(sample.images), self.mode, rng)
            picks.append((a, b))
            # json, then the two images (one when they coincide): three small reads at most per pair.
            ranges.append((sample.shard, sample.json[0], sample.json[0] + sample.json[1]))
            for i in ((a,) if a == b else (a, b)):
                ranges.append((sample.shard, sample.images[i][1], sample.images[i][1] + sample.images[i][2]))
        data = iter(self._fetcher.fetch(ranges))
        first, second, patients, keys, seeds, names = [], [], [], [], [], []
        for number, sample, (a, b) in zip(numbers, samples, picks):
            meta = json.loads(next(data))
            img_a = next(data)
            img_b = img_a if a == b else next(data)
            first.append(img_a)
            second.append(img_b)
            patients.append(patient_index(meta["patient_id"]))
            names.append(meta["patient_id"])
            keys.append((self._key(sample, a), self._key(sample, b)))
            seeds.append(mix_seed(self.seed, epoch, int(number), 2))
        pad = padding_like(self.batch_size - len(samples))
        return RawPairBatch(
            epoch=epoch, step=step, first=first + pad["first"], second=second + pad["second"],
            patient=np.concatenate([np.array(patients, np.int64), pad["patient"]]),
            valid=np.concatenate([np.ones(len(samples), bool), pad["valid"]]),
            keys=keys + pad["keys"], seeds=np.concatenate([np.array(seeds, np.uint64), pad["seeds"]]),
            patient_ids=names + [""] * len(pad["first"]))

    def _key(self, sample: Sample, image: int) -> str:
        return f"{self.shardset.shards[sample.shard].path}#{sample.key}.{sample.images[image][0]}"
