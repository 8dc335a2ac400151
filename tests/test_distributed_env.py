"""Rank resolution from each launcher's environment."""

import pytest

from medssl_scale.distributed.env import DistEnv, LaunchError, resolve


def test_single_process():
    assert resolve({}) == DistEnv(0, 1, 0, 1, "single")


def test_torchrun_and_deepspeed_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert resolve(env) == DistEnv(5, 8, 1, 4, "torchrun")


def test_slurm_variables_and_torchrun_priority():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert resolve(slurm) == DistEnv(3, 4, 1, 2, "slurm")
    assert resolve({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"


def test_inconsistent_environment_is_one_clear_error():
    with pytest.raises(LaunchError, match="outside world size"):
        resolve({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match="RANK='x'"):
        resolve({"RANK": "x", "WORLD_SIZE": "4"})
