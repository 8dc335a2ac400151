"""Turn SIGTERM/SIGUSR1/SIGINT (Slurm preemption, requeue, time limit, Ctrl-C) into a checkpoint and a clean exit."""

from __future__ import annotations

import signal

import torch

from ..distributed.gather import all_reduce_sum

# DataLoader workers ignore the same signals (augment/torchvision_loader.py): Slurm, `kill -- -PGID` and a
# terminal's Ctrl-C signal every process of the job, and only the training process may decide when to stop.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    """Records the first signal; `agreed()` asks every rank, so all save the same step together and all
    name the same signal, whichever rank (or ranks) received it."""

    SIGNALS = SIGNALS

    def __init__(self):
        self.received: signal.Signals | None = None
        self.ranks_received = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        # Later signals change nothing: the deepspeed launcher answers the group's SIGINT or SIGTERM with
        # SIGTERM of its own, and the first one is what the user sent.
        if self.received is None:
            self.received = signal.Signals(signum)

    def agreed(self, device: torch.device) -> str | None:
        """The name of the signal some rank received (the one most ranks received; the first of SIGNALS on
        a tie), the same on every rank; None when no rank got one. A collective: every rank calls it."""
        votes = torch.zeros(len(self.SIGNALS), dtype=torch.int64, device=device)
        if self.received is not None:
            votes[self.SIGNALS.index(self.received)] = 1
        votes = all_reduce_sum(votes).tolist()
        if not any(votes):
            return None
        self.ranks_received = sum(votes)
        return self.SIGNALS[max(range(len(votes)), key=lambda i: (votes[i], -i))].name
