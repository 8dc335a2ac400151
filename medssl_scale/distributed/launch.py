"""Start the process group the same way under the deepspeed launcher, torchrun or Slurm `srun`."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import zlib
from datetime import timedelta

from .env import DistEnv, LaunchError, resolve

log = logging.getLogger("medssl.train")


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


def slurm_job_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: derived from the job id, so that every task of the job agrees on
    it without talking, and jobs sharing a node differ (20000-39999)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port(preferred: int | None = None, tries: int = 50) -> int:
    """`preferred` if nothing listens there, else the next free one of the `tries` after it, else one the
    system picks. Checked where the rank-0 store will listen (the first node); another process may still
    take it before the store does, which the trainer then reports as one line."""
    if preferred:
        for port in range(preferred, min(preferred + tries, 65536)):
            if port_is_free(port):
                return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def export_rendezvous(dist: DistEnv) -> None:
    """Under srun, translate SLURM_* into the env:// variables torch expects. The batch script exports
    MASTER_PORT (launch/slurm/pretrain.sbatch checks the job's port is free on the first node); without it
    the port is derived from the job id, the same in every task."""
    if dist.launcher != "slurm":
        return
    os.environ.update(RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size), LOCAL_RANK=str(dist.local_rank),
                      LOCAL_WORLD_SIZE=str(dist.local_world_size))
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(slurm_job_port(os.environ.get("SLURM_JOB_ID", "0"))))


def _port_hint(dist: DistEnv) -> str:
    if dist.launcher == "slurm":
        return "export MASTER_PORT=<a free port> before srun (launch/slurm/pretrain.sbatch picks one itself)"
    if dist.launcher == "single":
        return "unset MASTER_PORT or export a free one"
    return "pass a free port with --master_port (deepspeed and torchrun both take it)"


def _address_in_use(e: BaseException) -> bool:
    text = str(e)
    return "EADDRINUSE" in text or "Address already in use" in text or "address already in use" in text


def init_process_group(cuda: bool, timeout_s: int = 600) -> DistEnv:
    """NCCL on GPUs, gloo on CPUs; a no-op for a single process started without a launcher.
    A rendezvous port already taken by another job is a LaunchError naming the option that fixes it."""
    dist = resolve()
    if dist.world_size == 1 and dist.launcher == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    export_rendezvous(dist)
    import deepspeed

    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
    except RuntimeError as e:  # torch.distributed.DistNetworkError from the rank-0 TCP store
        if not _address_in_use(e):
            raise
        raise LaunchError(f"rendezvous port {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} "
                          f"is already in use (another job on this machine?): {_port_hint(dist)}") from None
    if not cuda:
        set_cpu_threads(dist)
    return dist


def usable_cores(env: dict | None = None) -> int:
    """Cores this process may run on: Slurm's per-task allocation where there is one, else the affinity
    mask (which honours taskset and container limits)."""
    env = os.environ if env is None else env
    if env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(env["SLURM_CPUS_PER_TASK"])
    return len(os.sched_getaffinity(0))


def cpu_threads(dist: DistEnv, env: dict | None = None) -> int | None:
    """Intra-op threads for one CPU process, or None where OMP_NUM_THREADS already decides: torch would
    otherwise give every process all the node's cores, and N processes each running N threads on N cores
    ran 2.5x slower than one thread each (12 vs 30 pairs/s with 2 processes)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    if "SLURM_CPUS_PER_TASK" in env and dist.launcher == "slurm":
        return max(1, usable_cores(env))
    return max(1, usable_cores(env) // max(1, dist.local_world_size))


def set_cpu_threads(dist: DistEnv) -> int:
    """Apply `cpu_threads` and log what each process uses. Returns torch's intra-op thread count."""
    import torch

    n = cpu_threads(dist)
    if n is not None:
        torch.set_num_threads(n)
    if dist.is_main:
        why = ("from OMP_NUM_THREADS" if n is None else
               f"{usable_cores()} usable cores / {dist.local_world_size} processes on this node; "
               f"OMP_NUM_THREADS overrides")
        log.info("CPU threads per process: %d (%s)", torch.get_num_threads(), why)
    return torch.get_num_threads()
