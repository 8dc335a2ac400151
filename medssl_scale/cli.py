"""What the launch/ scripts share: a user error shown once, from rank 0, under any launcher."""

from __future__ import annotations

import signal
import sys
import time

from .distributed.env import LaunchError, resolve

# Every rank hits the same configuration error at about the same moment. Rank 0 reports it at once; the
# others wait this long first, and the launcher (deepspeed, torchrun, accelerate, srun --kill-on-bad-exit)
# stops them when rank 0 exits, so the error shows once. An error that only another rank hit still shows, late.
OTHER_RANKS_WAIT_S = 5.0


def launch_rank() -> int:
    try:
        return resolve().rank
    except LaunchError:
        return 0


def fail(prog: str, message: str, code: int) -> int:
    """Print `prog: error: message` (once across ranks) and return the exit status `code`."""
    if launch_rank() != 0:
        for sig in (signal.SIGTERM, signal.SIGINT):  # the launcher's SIGTERM ends this wait silently
            signal.signal(sig, signal.SIG_DFL)
        time.sleep(OTHER_RANKS_WAIT_S)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
