"""SOURCE and OUTPUT as s3:// URLs on a real S3 endpoint (moto's server): the same shards as on disk."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest

from shardtools import make_patient_tree, run_cli, shard_hashes, write_csv

pytestmark = pytest.mark.s3


def test_s3_round_trip_matches_local_build(s3_endpoint, tmp_path):
    src = tmp_path / "src"
    layout = make_patient_tree(src, patients=12, images_of=lambda p: 1 + p % 3)
    rows = [{"path": rel, "patient": pid} for pid, rels in layout.items() for rel in rels]
    write_csv(src / "rows.csv", rows)
    s3_endpoint.make_bucket("raw")
    s3_endpoint.make_bucket("shards")
    fs = fsspec.filesystem("s3")
    fs.put(str(src), "raw/study", recursive=True)
    args = ["--patient-col", "patient", "--shard-size", "20KB", "--max-side", "32", "--quiet"]

    local = tmp_path / "local"
    run_cli("build", src, local, "--manifest", src / "rows.csv", *args)
    run_cli("build", "s3://raw/study", "s3://shards/run1", "--manifest", "s3://raw/study/rows.csv", *args)

    manifest = json.loads(fs.cat_file("shards/run1/manifest.json"))
    remote = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for key in ("path", "index"):
                data = fs.cat_file(f"shards/run1/{shard[key]}")
                remote.append((shard[key], hashlib.sha256(data).hexdigest()))
            assert hashlib.sha256(fs.cat_file(f"shards/run1/{shard['path']}")).hexdigest() == shard["sha256"]
    assert sorted(remote) == shard_hashes(local)
    assert not [p for p in fs.find("shards/run1") if "tmp-" in p]

    assert "OK" in run_cli("verify", "s3://shards/run1").stdout
    summary = json.loads(run_cli("inspect", "s3://shards/run1", "--json").stdout)
    assert summary["total"]["images"] == len(rows) and summary["total"]["patients"] == len(layout)
    # One changed byte on the object store is caught too.
    victim = manifest["splits"]["train"]["shards"][0]["path"]
    data = bytearray(fs.cat_file(f"shards/run1/{victim}"))
    data[1000] ^= 0xFF
    fs.pipe_file(f"shards/run1/{victim}", bytes(data))
    proc = run_cli("verify", "s3://shards/run1", check=False)
    assert proc.returncode == 1 and victim in proc.stderr


def test_reader_streams_pairs_from_s3(s3_endpoint, tmp_path):
    from medssl_scale.data.reader import ShardPairSource
    from medssl_scale.data.shardset import ShardSet

    src = tmp_path / "src"
    make_patient_tree(src, patients=9, images_of=lambda p: 1 + p % 3)
    s3_endpoint.make_bucket("stream")
    args = ["--patient-regex", r"^(P\d+)/", "--splits", "train=1", "--shard-size", "10KB", "--quiet"]
    run_cli("build", src, "s3://stream/shards", *args)
    run_cli("build", src, tmp_path / "local", *args)
    remote = ShardSet.open("s3://stream/shards", "train")
    local = ShardSet.open(str(tmp_path / "local"), "train")
    assert len(remote.shards) > 1
    for rank in range(2):
        r = list(ShardPairSource(remote, rank, 2, batch_size=3).batches(1))
        loc = list(ShardPairSource(local, rank, 2, batch_size=3).batches(1))
        assert [b.keys for b in r] == [b.keys for b in loc]
        assert [b.first for b in r] == [b.first for b in loc] and [b.second for b in r] == [b.second for b in loc]
    # A shard cut short on the object store is named before any step runs.
    fs = fsspec.filesystem("s3")
    victim = remote.shards[1].path
    fs.pipe_file(f"stream/shards/{victim}", fs.cat_file(f"stream/shards/{victim}")[:2048])
    with pytest.raises(Exception, match=victim.replace("/", ".")):
        ShardSet.open("s3://stream/shards", "train")
