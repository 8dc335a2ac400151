"""Who am I in the job: global rank, world size and local rank, from torchrun, DeepSpeed or Slurm."""

from __future__ import annotations

import os
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variables."""


@dataclass(frozen=True)
class DistEnv:
    rank: int               # global rank: what data sharding must use (never the local rank)
    world_size: int
    local_rank: int         # which device of this node
    local_world_size: int
    launcher: str           # "torchrun" (also the deepspeed launcher), "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def resolve(env: dict | None = None) -> DistEnv:
    """torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK; `srun` exports SLURM_PROCID,
    SLURM_NTASKS and SLURM_LOCALID. RANK wins when both are present (torchrun inside an sbatch job)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        # torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE (processes on this node).
        size_var = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if v in env), None)
        local_world = _int(env, size_var) if size_var else max(1, world)
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        # SLURM_NTASKS_PER_NODE may read "4(x2)"; the step's tasks on this node are what we need.
        local_world = int(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
        launcher = "slurm"
    else:
        return DistEnv(0, 1, 0, 1, "single")
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside world size {world} ({launcher} environment)")
    if local < 0:
        raise LaunchError(f"local rank {local} is negative ({launcher} environment)")
    return DistEnv(rank, world, local, local_world, launcher)
