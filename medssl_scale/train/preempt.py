"""Turn SIGTERM/SIGUSR1 (Slurm preemption, requeue, time limit) into a checkpoint and a clean exit."""

from __future__ import annotations

import signal

import torch

from ..distributed.sync import any_rank


class Preemption:
    """Records a signal; `agreed()` asks every rank, so all save the same step together."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        return any_rank(self.received is not None, device)
