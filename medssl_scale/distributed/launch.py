"""Start the process group the same way under the deepspeed launcher, torchrun or Slurm `srun`."""

from __future__ import annotations

import os
import subprocess
import zlib
from datetime import timedelta

from .env import DistEnv, resolve


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:  # expands compressed lists such as gpu[01-04]
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0]


def export_rendezvous(dist: DistEnv) -> None:
    """Under srun, translate SLURM_* into the env:// variables torch expects; the port is derived from
    the job id so every task of the job picks the same one, and jobs sharing a node do not collide."""
    if dist.launcher != "slurm":
        return
    os.environ.update(RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(dist.local_rank),
                      LOCAL_WORLD_SIZE=str(dist.local_world_size))
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    job = os.environ.get("SLURM_JOB_ID", "0")
    os.environ.setdefault("MASTER_PORT", str(20000 + zlib.crc32(job.encode()) % 20000))


def init_process_group(cuda: bool, timeout_s: int = 600) -> DistEnv:
    """NCCL on GPUs, gloo on CPUs; a no-op for a single process started without a launcher."""
    dist = resolve()
    if dist.world_size == 1 and dist.launcher == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    export_rendezvous(dist)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), verbose=False)
    return dist
