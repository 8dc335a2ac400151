"""Forwards that leave BatchNorm running statistics untouched (recomputation, cached-embedding passes)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Inside, training-mode forwards of `module` compute batch statistics as usual, but every BatchNorm's
    running_mean, running_var and num_batches_tracked are restored on exit.

    A forward that repeats one already counted must not update them again: activation checkpointing
    recomputes each stage in backward, and contrastive accumulation embeds each micro-batch twice. Without
    this the exported statistics would be updated twice per step (momentum 0.19 instead of 0.1).
    """
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
             and m.running_mean is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
