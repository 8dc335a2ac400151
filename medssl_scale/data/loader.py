"""Make the pair loader of this rank: open the shard set, pick the backend, wire rank and device."""

from __future__ import annotations

import importlib.util

from ..augment.policy import AugmentPolicy
from ..distributed.env import DistEnv, resolve
from .reader import ShardPairSource
from .shardset import ShardSet

BACKENDS = ("auto", "dali", "torchvision")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def choose_backend(requested: str, cuda: bool) -> str:
    """'auto' means DALI on a GPU, torchvision on CPU machines (DALI's CPU mode is opt-in: 'dali')."""
    if requested not in BACKENDS:
        raise ValueError(f"data backend {requested!r}: use one of {BACKENDS}")
    if requested == "auto":
        return "dali" if cuda and dali_available() else "torchvision"
    if requested == "dali" and not dali_available():
        raise ValueError("data backend 'dali' needs the nvidia-dali package (pip install nvidia-dali-cuda130)")
    return requested


def make_pair_loader(shards: str, split: str, batch_size: int, policy: AugmentPolicy, *, mode: str = "micle",
                     backend: str = "auto", dist: DistEnv | None = None, seed: int = 0, workers: int = 2,
                     on_corrupt: str = "skip", cuda: bool | None = None):
    """The loader of this rank's pairs. `batch_size` is per rank; `workers` are DataLoader processes
    (torchvision) or DALI CPU threads. Shards are checked here, before training starts."""
    import torch

    dist = dist or resolve()
    cuda = torch.cuda.is_available() if cuda is None else cuda
    source = ShardPairSource(ShardSet.open(shards, split), dist.rank, dist.world_size, batch_size, mode, seed)
    if choose_backend(backend, cuda) == "dali":
        from ..augment.dali_backend import DaliPairLoader

        return DaliPairLoader(source, policy, device_id=dist.local_rank if cuda else None, num_threads=workers,
                              on_corrupt=on_corrupt, seed=seed)
    from ..augment.torchvision_loader import TorchvisionPairLoader

    device = f"cuda:{dist.local_rank}" if cuda else "cpu"
    return TorchvisionPairLoader(source, policy, num_workers=workers, device=device, on_corrupt=on_corrupt,
                                 pin_memory=cuda)
