"""Reader + backend end to end: real DataLoader workers per rank, exactly once, equal steps, resume."""

from __future__ import annotations

import pytest
import torch

from medssl_scale.augment.policy import policy_from_config
from medssl_scale.augment.torchvision_loader import TorchvisionPairLoader
from medssl_scale.data.reader import ShardPairSource
from medssl_scale.data.shardset import ShardSet
from shardtools import make_patient_tree, run_cli

POLICY = policy_from_config({"preset": "simclr", "size": 32})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    make_patient_tree(root / "src", patients=23, images_of=lambda p: 1 + p % 3)
    run_cli("build", root / "src", root / "out", "--patient-regex", r"^(P\d+)/", "--splits", "train=1",
            "--shard-size", "15KB", "--quiet")
    return str(root / "out")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_with_two_workers_see_each_sample_once(shards, world):
    shardset = ShardSet.open(shards, "train")
    all_keys = {s.key for s in shardset.samples}
    seen, steps = [], set()
    for rank in range(world):
        loader = TorchvisionPairLoader(ShardPairSource(shardset, rank, world, batch_size=4), POLICY, num_workers=2)
        loader.set_epoch(1)
        batches = list(loader)
        steps.add(len(batches))
        for b in batches:
            assert b.view1.shape == b.view2.shape == (4, 3, 32, 32) and b.view1.dtype == torch.float32
            seen += [k[0].split("#")[1].split(".")[0] for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert len(steps) == 1
    assert sorted(seen) == sorted(all_keys)


def test_loader_state_resumes_with_the_next_batch(shards):
    shardset = ShardSet.open(shards, "train")
    first = TorchvisionPairLoader(ShardPairSource(shardset, 0, 1, batch_size=3), POLICY, num_workers=2)
    first.set_epoch(0)
    reference = list(first)
    interrupted = TorchvisionPairLoader(ShardPairSource(shardset, 0, 1, batch_size=3), POLICY, num_workers=2)
    interrupted.set_epoch(0)
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    del it
    resumed = TorchvisionPairLoader(ShardPairSource(ShardSet.open(shards, "train"), 0, 1, batch_size=3), POLICY,
                                    num_workers=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.step for b in rest] == [b.step for b in reference[3:]]
    for x, y in zip(reference[3:], rest):
        assert x.keys == y.keys and torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2)
