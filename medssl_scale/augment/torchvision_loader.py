"""Resumable, step-ordered PairBatch loading through a torch DataLoader with the torchvision backend."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medssl_scale.augment.policy import AugmentPolicy
from medssl_scale.augment.torchvision_backend import TorchvisionAugmenter
from medssl_scale.data.batch import EpochCursor, PairBatch, PairSource


def _as_is(batch: dict) -> dict:
    # Module level so worker processes can pickle it; the default would re-wrap the keys list.
    return batch


class _AugmentedSteps(IterableDataset):
    """One epoch's augmented steps from `start_step` on; worker w of n takes steps start_step + w + k n."""

    def __init__(self, source: PairSource, augmenter: TorchvisionAugmenter, epoch: int, start_step: int):
        self.source, self.augmenter, self.epoch, self.start_step = source, augmenter, epoch, start_step

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for raw in self.source.batches(self.epoch, self.start_step, worker=worker, num_workers=n):
            out = self.augmenter(raw)
            out.update(keys=list(raw.keys), epoch=raw.epoch, step=raw.step)
            yield out


class TorchvisionPairLoader(EpochCursor):
    """Iterates one epoch of PairBatch in step order from a cursor (epoch, step) that resumes exactly.

    `__iter__` starts at the cursor and advances it past each yielded batch: call `set_epoch` before each
    epoch; after `load_state_dict(state_dict())` the next batch is the first one not yet yielded.
    """

    def __init__(self, source: PairSource, policy: AugmentPolicy, num_workers: int = 2, device="cpu",
                 on_corrupt: str = "skip", pin_memory: bool = False):
        self.source = source
        self.augmenter = TorchvisionAugmenter(policy, on_corrupt=on_corrupt)
        self.num_workers = num_workers
        self.device = torch.device(device)
        # Pinning needs an accelerator; without one DataLoader only warns and copies nothing.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.epoch, self.step = 0, 0
        self.corrupt_skipped = 0

    def __iter__(self) -> Iterator[PairBatch]:
        epoch, total = self.epoch, self.source.steps_per_epoch()
        if self.step >= total:
            return
        dataset = _AugmentedSteps(self.source, self.augmenter, epoch, self.step)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, persistent_workers=False)
        for out in loader:
            # DataLoader takes from workers round-robin, so this holds while every worker keeps to its
            # share of steps; a source that does not would silently reorder or repeat data.
            if out["step"] != self.step or out["epoch"] != epoch:
                raise RuntimeError(f"loader expected epoch {epoch} step {self.step} but got epoch "
                                   f"{out['epoch']} step {out['step']}: the PairSource must yield, for worker w "
                                   f"of n, the steps with (step - start_step) % n == w in order")
            self.corrupt_skipped += out["corrupt"]
            batch = PairBatch(view1=self._to_device(out["view1"]), view2=self._to_device(out["view2"]),
                              patient=self._to_device(out["patient"]), valid=self._to_device(out["valid"]),
                              keys=out["keys"], epoch=epoch, step=out["step"])
            self.step += 1  # before yielding: state_dict() taken with this batch in hand points past it
            yield batch
        if self.step != total:
            raise RuntimeError(f"PairSource ended epoch {epoch} at step {self.step} of {total}")

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)
