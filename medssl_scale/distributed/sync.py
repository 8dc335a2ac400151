"""Small synchronisation points of the training loop (barriers, agreeing on a flag)."""

from __future__ import annotations

import torch

from .gather import all_reduce_sum, is_distributed


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when the flag is set on at least one (e.g. a preemption signal)."""
    return bool(all_reduce_sum(torch.tensor([1 if flag else 0], device=device)).item() > 0)
