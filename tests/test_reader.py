"""The shard reader: MICLe/SimCLR pairing, exactly-once epochs over ranks and workers, resume, bad shards."""

from __future__ import annotations

import collections
import json
import tarfile

import numpy as np
import pytest

from medssl_scale.data.reader import ShardPairSource, patient_index
from medssl_scale.data.shardset import ShardSet, ShardSetError
from shardtools import SHARED_DATA, make_patient_tree, run_cli


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """A build whose patients have 1..6 images (bags of at most 4), over several shards."""
    root = tmp_path_factory.mktemp("reader")
    layout = make_patient_tree(root / "src", patients=47, images_of=lambda p: 1 + p % 6)
    out = root / "shards"
    run_cli("build", root / "src", out, "--patient-regex", r"^(P\d+)/", "--images-per-sample", "4",
            "--splits", "train=1", "--shard-size", "25KB", "--quiet")
    return out, layout


def _tar_samples(out):
    """Independent reference: every sample of the build, read with tarfile."""
    samples = {}
    for path in sorted(out.glob("train/*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                entry = samples.setdefault(key, {"images": {}, "shard": f"train/{path.name}"})
                data = tar.extractfile(m).read()
                if ext == "json":
                    entry["json"] = json.loads(data)
                else:
                    entry["images"][ext] = data
    return samples


def _keys_of(batch):
    return [k[0].split("#")[1].split(".")[0] for k, v in zip(batch.keys, batch.valid) if v]


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 2), (4, 3)])
def test_every_sample_once_per_epoch_and_equal_steps(build, world, workers):
    out, _ = build
    shardset = ShardSet.open(str(out), "train")
    reference = _tar_samples(out)
    assert len(shardset) == len(reference) and len(shardset.shards) > 3
    for epoch in (0, 1):
        seen, steps, shapes = [], set(), set()
        for rank in range(world):
            source = ShardPairSource(shardset, rank, world, batch_size=5, seed=3)
            batches = [b for w in range(workers) for b in source.batches(epoch, worker=w, num_workers=workers)]
            steps.add(len(batches))
            assert sorted(b.step for b in batches) == list(range(source.steps_per_epoch()))
            shapes |= {(len(b.first), len(b.second), b.patient.shape, b.valid.shape) for b in batches}
            seen += [k for b in batches for k in _keys_of(b)]
        assert len(steps) == 1 and len(shapes) == 1  # same number of steps and shapes on every rank
        assert sorted(seen) == sorted(reference)  # the whole split, each sample exactly once


def test_micle_pairs_are_two_different_images_of_the_patient(build):
    out, layout = build
    shardset = ShardSet.open(str(out), "train")
    reference = _tar_samples(out)
    source = ShardPairSource(shardset, 0, 1, batch_size=8, mode="micle")
    pairs_by_key = collections.defaultdict(set)
    for epoch in range(4):
        for b in source.batches(epoch):
            for (ka, kb), a, bb, pid, valid in zip(b.keys, b.first, b.second, b.patient, b.valid):
                if not valid:
                    assert ka == kb == "" and pid == -1
                    continue
                key, ext_a = ka.split("#")[1].split(".", 1)
                ext_b = kb.split("#")[1].split(".", 1)[1]
                ref = reference[key]
                assert a == ref["images"][ext_a] and bb == ref["images"][ext_b]  # the bytes of those members
                assert pid == patient_index(ref["json"]["patient_id"])
                if len(ref["images"]) >= 2:
                    assert ext_a != ext_b and a != bb
                else:
                    assert ext_a == ext_b
                pairs_by_key[key].add(frozenset((ext_a, ext_b)))
    # Pairs are redrawn every epoch: bags of 3-4 images show more than one pair over 4 epochs.
    big = [k for k, r in reference.items() if len(r["images"]) >= 3]
    assert big and sum(len(pairs_by_key[k]) > 1 for k in big) >= len(big) // 2


def test_simclr_mode_uses_one_image_for_both_views(build):
    out, _ = build
    source = ShardPairSource(ShardSet.open(str(out), "train"), 0, 1, batch_size=16, mode="simclr")
    for b in source.batches(0):
        assert all(ka == kb for ka, kb in b.keys) and all(x == y for x, y in zip(b.first, b.second))


def test_resume_continues_with_the_next_batches(build):
    out, _ = build
    shardset = ShardSet.open(str(out), "train")
    full = list(ShardPairSource(shardset, 1, 2, batch_size=4, seed=9).batches(2))
    resumed = list(ShardPairSource(ShardSet.open(str(out), "train"), 1, 2, batch_size=4, seed=9).batches(2, start_step=3))
    assert [b.step for b in resumed] == [b.step for b in full[3:]]
    for x, y in zip(full[3:], resumed):
        assert x.keys == y.keys and x.first == y.first and np.array_equal(x.seeds, y.seeds)


def test_epochs_differ_and_seeds_are_layout_independent(build):
    out, _ = build
    shardset = ShardSet.open(str(out), "train")
    one = {k: s for b in ShardPairSource(shardset, 0, 1, 6, seed=1).batches(0) for k, s, v in
           zip(b.keys, b.seeds, b.valid) if v}
    two = {k: s for r in range(2) for b in ShardPairSource(shardset, r, 2, 6, seed=1).batches(0) for k, s, v in
           zip(b.keys, b.seeds, b.valid) if v}
    assert one == two  # the same pair and augmentation seed for each sample, whatever the world size
    e0 = [_keys_of(b) for b in ShardPairSource(shardset, 0, 1, 6, seed=1).batches(0)]
    e1 = [_keys_of(b) for b in ShardPairSource(shardset, 0, 1, 6, seed=1).batches(1)]
    assert e0 != e1


def test_broken_shards_are_reported_before_training(build, tmp_path):
    out, _ = build
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shards = sorted(broken.glob("train/*.tar"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    shards[2].unlink()  # missing
    with pytest.raises(ShardSetError) as err:
        ShardSet.open(str(broken), "train")
    message = str(err.value)
    assert f"train/{shards[1].name}" in message and "truncated" in message
    assert f"train/{shards[2].name}: missing" in message and "2 unusable shard(s)" in message
    with pytest.raises(ShardSetError, match="no split 'val'"):
        ShardSet.open(str(out), "val")
    with pytest.raises(ShardSetError, match="no manifest.json"):
        ShardSet.open(str(tmp_path), "train")


def test_covid_micle_pairs_and_two_rank_union(tmp_path):
    covid = SHARED_DATA / "covid_cxr"
    if not (covid / "metadata.csv").exists():
        pytest.skip("../shared/data/covid_cxr is absent")
    out = tmp_path / "covid"
    run_cli("build", covid, out, "--manifest", covid / "metadata.csv", "--patient-col", "patient_id",
            "--shard-size", "8MB", "--quiet")
    shardset = ShardSet.open(str(out), "train")
    reference = _tar_samples(out)
    train_keys = sorted(k for k, r in reference.items() if r["shard"].startswith("train/"))
    seen = []
    for rank in range(2):
        for b in ShardPairSource(shardset, rank, 2, batch_size=32, mode="micle").batches(0):
            for (ka, kb), valid in zip(b.keys, b.valid):
                if not valid:
                    continue
                key = ka.split("#")[1].split(".")[0]
                seen.append(key)
                if len(reference[key]["images"]) >= 2:
                    assert ka != kb
                    srcs = {img["member"]: img["source"] for img in reference[key]["json"]["images"]}
                    member = [k.split("#")[1].split(".", 1)[1] for k in (ka, kb)]
                    assert srcs[member[0]] != srcs[member[1]]  # two different source images
    assert sorted(seen) == train_keys
