"""The few members of Accelerate's `Accelerator` that the evaluation code calls, over torch.distributed.

The evaluation job runs under Accelerate; the pretraining loop (DeepSpeed, torchrun, srun) has a plain
process group. The kNN monitor reuses the evaluation job's feature extraction (finetune/features.py
run_over_split) through this view instead of a copy of it.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .gather import gather_nograd, rank, world_size
from .sync import barrier


class RankGroup:
    """process_index, num_processes, device, gather, autocast, wait_for_everyone, as an Accelerator has them."""

    def __init__(self, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.device = device
        self._autocast = autocast or contextlib.nullcontext

    @property
    def process_index(self) -> int:
        return rank()

    @property
    def num_processes(self) -> int:
        return world_size()

    @property
    def is_main_process(self) -> bool:
        return rank() == 0

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (B, ...) tensor, concatenated in rank order (equal B on every rank)."""
        return gather_nograd(t)

    def autocast(self):
        return self._autocast()

    def wait_for_everyone(self) -> None:
        barrier()
