"""Resumable, step-ordered PairBatch loading through a torch DataLoader with the torchvision backend."""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import os
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from medssl_scale.augment.policy import AugmentPolicy
from medssl_scale.augment.torchvision_backend import TorchvisionAugmenter
from medssl_scale.data.batch import EpochCursor, PairBatch, PairSource


def _as_is(batch: dict) -> dict:
    # Module level so worker processes can pickle it; the default would re-wrap the keys list.
    return batch


# What the trainer turns into a checkpoint (train/preempt.py). Slurm signals every process of a job step,
# and `kill -- -PGID` or a terminal's Ctrl-C the whole process group: DataLoader workers included. A worker
# that died of it would crash the training process mid-step, before it could save.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_owner_exiting = None  # an Event set when the process that owns the workers exits (see _allow_termination)


def _allow_termination() -> None:
    # At exit, multiprocessing terminates daemonic children (SIGTERM) and then joins them without a timeout:
    # workers still running at that point (a loader iterated only part-way) must then obey SIGTERM after all.
    _owner_exiting.set()


def _worker_init(exiting, worker_id: int) -> None:
    """In each worker: torch has just made SIGTERM fatal here; the owning process decides when workers stop
    (it shuts them down itself, and SIGKILL or the death of the owner still ends them)."""

    def on_signal(signum, frame):
        if signum == signal.SIGTERM and exiting.is_set():
            os._exit(0)

    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, on_signal)
    # Signals held by the owner while it forked us (see _held) arrive now, and are dropped.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)


@contextlib.contextmanager
def _held():
    """Block the preemption signals in this thread while workers are forked: they inherit the mask, so a
    signal that lands between the fork and `_worker_init` waits for `_worker_init` instead of killing them."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exiting_event():
    global _owner_exiting
    if _owner_exiting is None:
        _owner_exiting = multiprocessing.Event()
        atexit.register(_allow_termination)  # after torch's and multiprocessing's hooks, so it runs first
    return _owner_exiting


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
        init = functools.partial(_worker_init, _exiting_event()) if self.num_workers else None
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            pin_memory=self.pin_memory, persistent_workers=False, worker_init_fn=init)
        with _held():
            batches = iter(loader)  # forks the workers
        try:
            yield from self._in_order(batches, epoch, total)
        finally:
            # Closing this generator (or dropping it) stops the workers now rather than at interpreter exit
            # (what the iterator's __del__ does too, when nothing else holds it).
            getattr(batches, "_shutdown_workers", lambda: None)()

    def _in_order(self, batches, epoch: int, total: int) -> Iterator[PairBatch]:
        for out in batches:
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


def signal_safe_batches(dataset, batch_size: int, num_workers: int, pin_memory: bool = False) -> Iterator:
    """Batches of a map-style `dataset` in order, from workers that leave preemption signals to their owner
    (as TorchvisionPairLoader's): the evaluation job's loader."""
    init = functools.partial(_worker_init, _exiting_event()) if num_workers else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=pin_memory and torch.cuda.is_available(), worker_init_fn=init)
    with _held():
        batches = iter(loader)
    try:
        yield from batches
    finally:
        getattr(batches, "_shutdown_workers", lambda: None)()
