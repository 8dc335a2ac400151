"""Turn SIGTERM/SIGUSR1/SIGINT (Slurm preemption, requeue, time limit, Ctrl-C) into a checkpoint and a clean exit."""

from __future__ import annotations

import logging
import os
import signal

import torch

from ..distributed.gather import all_reduce_sum
from ..distributed.sync import barrier

log = logging.getLogger("medssl.train")
# DataLoader workers ignore the same signals (augment/torchvision_loader.py): Slurm, `kill -- -PGID` and a
# terminal's Ctrl-C signal every process of the job, and only the training process may decide when to stop.
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Set by launch/slurm/pretrain.sbatch: the file rank 0 writes once the checkpoint a signal asked for is
# complete, which is what the script requeues on (srun's exit status alone is not reliable, see saved()).
REQUEUE_MARKER_ENV = "MEDSSL_REQUEUE_MARKER"


class Preemption:
    """Records the first signal; `agreed()` asks every rank, so all save the same step together and all
    name the same signal, whichever rank (or ranks) received it."""

    SIGNALS = SIGNALS

    def __init__(self):
        self.received: signal.Signals | None = None
        self.ranks_received = 0
        self.stopping: str | None = None
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
        self.stopping = self.SIGNALS[max(range(len(votes)), key=lambda i: (votes[i], -i))].name
        # From here on the process is saving and leaving, and another signal must not change how it ends.
        # Ignored, not merely caught: at exit Python puts back SIG_DFL for every signal that has a Python
        # handler (then tears down modules, CUDA, NCCL: seconds), and under `srun --kill-on-bad-exit` the
        # first rank to exit 99 makes Slurm SIGTERM the others. Caught there, that SIGTERM killed a rank
        # that had saved (status 143, and no requeue); ignored, it survives to exit 99. SIG_IGN is kept.
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return self.stopping

    def saved(self, checkpoint: str, step: int, is_main: bool) -> None:
        """Call on every rank once the checkpoint that the agreed signal asked for is complete, before
        exiting 99. Rank 0 writes `$MEDSSL_REQUEUE_MARKER` (when set: the Slurm template sets it), whole
        or not at all; the barrier after it keeps every rank from exiting before the file exists.

        The template requeues on that file: srun's own status says 99 only when every task exited 99,
        and a task that dies after saving (killed at KillWait while stuck in teardown, a crash at exit,
        a signal) makes it 137, 143, ... although the checkpoint is complete. A collective."""
        path = os.environ.get(REQUEUE_MARKER_ENV)
        if path and is_main:
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    f.write(f"signal={self.stopping} checkpoint={checkpoint} step={step}\n")
                os.replace(tmp, path)
            except OSError as e:
                log.warning("cannot write the requeue marker %s=%s (%s): the Slurm template then requeues "
                            "only if every task exits 99", REQUEUE_MARKER_ENV, path, e)
        barrier()
