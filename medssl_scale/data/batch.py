"""What flows between the reader and the augmentation backends, and out of them to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


class CorruptImage(ValueError):
    """Encoded bytes that do not decode to an image; raised (naming the key) when on_corrupt is "error"."""


@dataclass
class RawPairBatch:
    """One step's pairs for one rank, still encoded.

    Every batch of an epoch has exactly `batch_size` entries on every rank, so collectives never see
    different shapes; entries beyond the data (the end of an epoch) are padding with valid=False.
    """

    epoch: int
    step: int                        # index of this batch within the epoch, on this rank
    first: list[bytes]               # encoded image (JPEG/PNG) for view 1; b"" for padding
    second: list[bytes]              # encoded image for view 2 (the same bytes in SimCLR mode)
    patient: np.ndarray              # int64 (B,): a stable 63-bit hash of the patient id; -1 for padding
    valid: np.ndarray                # bool (B,)
    keys: list[tuple[str, str]]      # ("<shard>#<key>.<member>", ...) of the two source images; ("", "") padding
    seeds: np.ndarray                # uint64 (B,): per-pair augmentation seed from (seed, epoch, sample)
    patient_ids: list[str] = field(default_factory=list)  # as in the shards, for people ("" for padding)

    def __len__(self) -> int:
        return len(self.first)


class PairSource(Protocol):
    """A rank's view of a shard set (medssl_scale.data.reader.ShardPairSource implements it)."""

    batch_size: int

    def steps_per_epoch(self) -> int:
        """The same on every rank."""

    def batches(self, epoch: int, start_step: int = 0, worker: int = 0,
                num_workers: int = 1) -> Iterator[RawPairBatch]:
        """This rank's batches of `epoch`, from `start_step` on, keeping those with
        (step - start_step) % num_workers == worker, in step order."""


def padding_like(n: int) -> dict:
    """Field values of n padding entries."""
    return {"first": [b""] * n, "second": [b""] * n, "patient": np.full(n, -1, np.int64),
            "valid": np.zeros(n, bool), "keys": [("", "")] * n, "seeds": np.zeros(n, np.uint64)}


@dataclass
class PairBatch:
    """One augmented step, as the trainer receives it from either backend."""

    view1: "torch.Tensor"            # (B, 3, H, W), normalized, policy dtype, on the device
    view2: "torch.Tensor"
    patient: "torch.Tensor"          # int64 (B,)
    valid: "torch.Tensor"            # bool (B,); False for padding and skipped corrupt images
    keys: list[tuple[str, str]]
    epoch: int
    step: int


class EpochCursor:
    """The loaders' position: (epoch, next step). Saved in checkpoints; restoring it makes the next batch
    yielded the very one that would have come next."""

    epoch: int = 0
    step: int = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.step = int(epoch), int(start_step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state["step"])
