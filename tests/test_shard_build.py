"""medssl-shard build on generated fixtures: grouping, splits, determinism, resizing, verify, inspect."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import shutil

import pytest
from PIL import Image

from shardtools import (make_patient_tree, read_manifest, read_samples, run_cli, shard_hashes, write_csv,
                        write_image)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    layout = make_patient_tree(root, patients=60, images_of=lambda p: 1 + p % 11)
    return root, layout


def _build(src, out, *extra):
    return run_cli("build", src, out, "--patient-regex", r"^(P\d+)/", "--quiet", *extra)


def test_patient_grouping_and_bags(tree, tmp_path):
    src, layout = tree
    out = tmp_path / "out"
    _build(src, out, "--images-per-sample", "4", "--shard-size", "40KB")
    samples = read_samples(out)
    by_patient = collections.defaultdict(list)
    for s in samples:
        meta = s["json"]
        assert "." not in s["key"] and meta["key"] == s["key"]
        assert meta["split"] == s["split"]
        members = sorted(k for k in s if k[:1].isdigit())
        assert members == sorted(img["member"] for img in meta["images"])
        by_patient[meta["patient_id"]].append(meta)
    assert set(by_patient) == set(layout)
    for pid, metas in by_patient.items():
        sources = [img["source"] for m in metas for img in m["images"]]
        assert sorted(sources) == sorted(layout[pid])  # every image of the patient, once
        n = len(layout[pid])
        sizes = sorted(len(m["images"]) for m in metas)
        n_bags = -(-n // 4)
        assert len(metas) == n_bags and all(m["bags"] == n_bags for m in metas)
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= 4  # 9 images -> 3+3+3, never 4+4+1
        assert len({m["split"] for m in metas}) == 1
    m = read_manifest(out)
    assert sum(s["images"] for s in m["splits"].values()) == sum(map(len, layout.values()))
    assert sum(len(s["shards"]) for s in m["splits"].values()) > 3  # small --shard-size gave several shards


def test_no_patient_in_two_splits_and_fractions(tmp_path):
    src = tmp_path / "src"
    layout = make_patient_tree(src, patients=400, images_of=lambda p: 1 + p % 2, size=(16, 16))
    out = tmp_path / "out"
    _build(src, out, "--splits", "train=0.5,val=0.25,test=0.25", "--seed", "7")
    split_of = collections.defaultdict(set)
    for s in read_samples(out):
        split_of[s["json"]["patient_id"]].add(s["split"])
    assert set(split_of) == set(layout)
    assert all(len(v) == 1 for v in split_of.values())
    counts = collections.Counter(next(iter(v)) for v in split_of.values())
    # Hash splits are random per patient: 400 patients at p=0.25 gives sd ~8.7; allow 4 sd.
    assert abs(counts["train"] - 200) < 40 and abs(counts["val"] - 100) < 35 and abs(counts["test"] - 100) < 35
    # The assignment is a pure function of (seed, patient id): recompute it independently.
    for pid, splits in split_of.items():
        u = int.from_bytes(hashlib.sha256(f"split\x1f7\x1f{pid}".encode()).digest()[:8], "big") / 2**64
        assert next(iter(splits)) == ("train" if u < 0.5 else "val" if u < 0.75 else "test")


def test_deterministic_across_workers_and_tasks(tree, tmp_path):
    src, _ = tree
    args = ["--shard-size", "30KB", "--max-side", "32"]
    _build(src, tmp_path / "w1", "--workers", "1", *args)
    _build(src, tmp_path / "w2", "--workers", "2", *args)
    for t in range(3):
        _build(src, tmp_path / "t3", "--workers", "2", "--num-tasks", "3", "--task-index", str(t), *args)
    reference = shard_hashes(tmp_path / "w1")
    assert len(reference) > 6
    assert shard_hashes(tmp_path / "w2") == reference
    assert shard_hashes(tmp_path / "t3") == reference
    assert read_manifest(tmp_path / "t3")["splits"] == read_manifest(tmp_path / "w1")["splits"]


def test_array_task_alone_writes_no_manifest_then_merge(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "out"
    _build(src, out, "--shard-size", "30KB", "--num-tasks", "2", "--task-index", "1")
    assert not (out / "manifest.json").exists()
    proc = run_cli("merge", out, check=False)
    assert proc.returncode == 2 and "not written yet" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    _build(src, out, "--shard-size", "30KB", "--num-tasks", "2", "--task-index", "0")
    assert (out / "manifest.json").exists()  # the last task to finish writes it
    run_cli("merge", out)


def test_max_side_resizes_keeps_grayscale_and_zero_keeps_bytes(tmp_path):
    src = tmp_path / "src"
    big = write_image(src / "a" / "big.jpg", 1, size=(300, 200))
    gray = write_image(src / "b" / "gray.png", 2, size=(120, 400), mode="L")
    small = write_image(src / "c" / "small.jpg", 3, size=(50, 40))
    out = tmp_path / "out"
    run_cli("build", src, out, "--max-side", "100", "--quiet")
    got = {s["json"]["images"][0]["source"]: s for s in read_samples(out)}
    dims = {k: Image.open(io.BytesIO(v["0.jpg" if k.endswith("jpg") else "0.png"])) for k, v in got.items()}
    assert dims["a/big.jpg"].size == (100, 67) and dims["a/big.jpg"].mode == "RGB"
    assert dims["b/gray.png"].size == (30, 100) and dims["b/gray.png"].mode == "L"
    # Already small enough: stored untouched.
    assert got["c/small.jpg"]["0.jpg"] == small.read_bytes()
    out0 = tmp_path / "out0"
    run_cli("build", src, out0, "--max-side", "0", "--quiet")
    for s in read_samples(out0):
        img = s["json"]["images"][0]
        raw = (src / img["source"]).read_bytes()
        assert s[img["member"]] == raw and img["source_sha256"] == hashlib.sha256(raw).hexdigest()
    assert {big.name, gray.name} <= {s["json"]["images"][0]["source"].split("/")[-1] for s in read_samples(out0)}


def test_class_from_folder_labels(tmp_path):
    src = tmp_path / "imagenet"
    for cls, n in (("n01440764", 3), ("n01443537", 2)):
        for i in range(n):
            write_image(src / cls / f"{cls}_{i}.JPEG", hash((cls, i)) % 1000)
    out = tmp_path / "out"
    run_cli("build", src, out, "--class-from-folder", "--quiet")
    for s in read_samples(out):
        img = s["json"]["images"][0]
        assert img["labels"] == {"class": img["source"].split("/")[0]}
    labels = read_manifest(out)["labels"]["class"]
    assert labels["vocabulary"] == ["n01440764", "n01443537"]
    assert labels["counts"] == {"n01440764": 3, "n01443537": 2}


def test_split_col_and_jsonl_manifest(tmp_path):
    src = tmp_path / "src"
    rows = []
    for p in range(6):
        for k in range(2):
            rel = f"img/{p}_{k}.jpg"
            write_image(src / rel, p * 10 + k)
            rows.append({"file": rel, "pid": f"pat.{p}", "dx": "nv" if p % 2 else "mel",
                         "fold": "train" if p < 4 else "holdout"})
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    run_cli("build", src, out, "--manifest", src / "rows.jsonl", "--image-col", "file", "--patient-col", "pid",
            "--label-cols", "dx", "--split-col", "fold", "--quiet")
    m = read_manifest(out)
    assert set(m["splits"]) == {"holdout", "train"}
    assert m["splits"]["train"]["patients"] == 4 and m["splits"]["holdout"]["images"] == 4
    for s in read_samples(out):
        pid = s["json"]["patient_id"]
        assert s["split"] == ("train" if int(pid.split(".")[1]) < 4 else "holdout")
        assert "." not in s["key"]
        for img in s["json"]["images"]:
            assert img["labels"]["dx"] == ("nv" if int(pid.split(".")[1]) % 2 else "mel")
    # A patient whose rows disagree about the split is a run-level error.
    rows[1]["fold"] = "holdout"
    write_csv(src / "bad.csv", rows)
    proc = run_cli("build", src, tmp_path / "bad", "--manifest", src / "bad.csv", "--image-col", "file",
                   "--patient-col", "pid", "--split-col", "fold", check=False)
    assert proc.returncode == 2 and "pat.0" in proc.stderr
    assert not (tmp_path / "bad" / "_build" / "plan.json.gz").exists()


def test_verify_names_a_shard_with_one_changed_byte(tree, tmp_path):
    src, _ = tree
    out = tmp_path / "out"
    _build(src, out, "--shard-size", "30KB")
    ok = run_cli("verify", out)
    assert "OK" in ok.stdout
    victim = sorted(out.glob("train/shard-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1
    assert f"train/{victim.name}" in proc.stderr and "sha256" in proc.stderr
    assert proc.stderr.count("BROKEN") == 1


def test_inspect_json_matches_independent_counts(tree, tmp_path):
    src, layout = tree
    out = tmp_path / "out"
    _build(src, out)
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["total"]["patients"] == len(layout)
    assert summary["total"]["images"] == sum(map(len, layout.values()))
    hist = collections.Counter(len(v) for v in layout.values())
    assert summary["images_per_patient"] == {str(k): hist[k] for k in sorted(hist)}
    table = run_cli("inspect", out).stdout
    assert "images per patient" in table and "total" in table


@pytest.mark.parametrize("part_images", [1, 5])
def test_worker_part_size_never_changes_a_byte(tree, tmp_path, monkeypatch, part_images):
    """Workers pack parts of a shard independently; any cut gives the bytes of the default build."""
    from sharding import build as build_module
    from sharding.options import BuildOptions

    src, _ = tree
    args = ["--shard-size", "30KB", "--max-side", "32"]
    _build(src, tmp_path / "default", "--workers", "2", *args)
    monkeypatch.setattr(build_module, "PART_IMAGES", part_images)
    opts = BuildOptions(source=str(src), output=str(tmp_path / "cut"), patient_regex=r"^(P\d+)/", max_side=32,
                        shard_size=30_000, workers=2)
    build_module.build(opts, show_progress=False)
    assert shard_hashes(tmp_path / "cut") == shard_hashes(tmp_path / "default")
    assert read_manifest(tmp_path / "cut")["splits"] == read_manifest(tmp_path / "default")["splits"]


def test_copies_in_different_splits_are_printed_by_build_and_inspect(tmp_path):
    src = tmp_path / "src"
    rows = []
    for i, (patient, fold) in enumerate([("p1", "train"), ("p2", "train"), ("p3", "val"), ("p4", "test")]):
        write_image(src / f"img/{patient}.png", 40 + i, size=(30, 20))
        rows.append({"path": f"img/{patient}.png", "pid": patient, "fold": fold})
    # Byte copies of p1's image under other patients: one in val (a leak), one in train (no leak).
    for patient, fold in (("p5", "val"), ("p6", "train")):
        shutil.copy(src / "img/p1.png", src / f"img/{patient}.png")
        rows.append({"path": f"img/{patient}.png", "pid": patient, "fold": fold})
    (src / "img/p4_copy.png").write_bytes((src / "img/p4.png").read_bytes())  # test and test: no leak
    rows.append({"path": "img/p4_copy.png", "pid": "p7", "fold": "test"})
    write_csv(src / "rows.csv", rows)
    out = tmp_path / "out"
    build = run_cli("build", src, out, "--manifest", src / "rows.csv", "--patient-col", "pid", "--split-col", "fold")
    leaks = [d for d in read_manifest(out)["duplicates"] if len(d["splits"]) > 1]
    # One group (found by bytes; the same group by pixels is not listed twice), spread over train and val.
    assert [(d["kind"], d["sources"], d["splits"]) for d in leaks] == [
        ("same_content", ["img/p1.png", "img/p5.png", "img/p6.png"], ["train", "val"])]
    inspect = run_cli("inspect", out)
    for text in (build.stdout, inspect.stdout):
        assert "WARNING: 1 duplicate group with copies in different splits" in text, text
        assert "same_content: img/p1.png, img/p5.png, img/p6.png -> splits train, val" in text, text
        assert "p4_copy" not in text
    summary = json.loads(run_cli("inspect", out, "--json").stdout)
    assert summary["cross_split_duplicates"] == [{"kind": "same_content", "sources": ["img/p1.png", "img/p5.png",
                                                  "img/p6.png"], "splits": ["train", "val"],
                                                  "patients": ["p1", "p5", "p6"]}]
