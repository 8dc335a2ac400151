"""Bad input: image-level problems are skipped with a reason; run-level problems stop before any work."""

from __future__ import annotations

import os
import shutil

import pytest

from shardtools import (image_bytes, make_split_class_tree, read_manifest, read_samples, run_cli, write_csv,
                        write_image)


@pytest.fixture
def messy(tmp_path):
    """A manifest whose rows cover every image-level problem, next to good rows."""
    src = tmp_path / "src"
    good = [write_image(src / f"ok/{i}.jpg", i) for i in range(4)]
    (src / "bad").mkdir()
    full = image_bytes(99, size=(200, 200))
    (src / "bad/truncated.jpg").write_bytes(full[: len(full) // 2])
    (src / "bad/zero.jpg").write_bytes(b"")
    (src / "bad/text.jpg").write_bytes(b"this is not an image at all\n" * 20)
    corrupt = bytearray(image_bytes(98, size=(200, 200)))
    corrupt[20:400] = os.urandom(380)  # header tables destroyed, end marker intact
    (src / "bad/corrupt.jpg").write_bytes(bytes(corrupt))
    (src / "bad/broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    (tmp_path / "outside.jpg").write_bytes(image_bytes(97))
    rows = [{"path": f"ok/{i}.jpg", "patient": f"p{i // 2}"} for i in range(3)]
    rows.append({"path": str(src / "ok/3.jpg"), "patient": "p1"})  # absolute, but below SOURCE: fine
    bad = {"bad/truncated.jpg": "truncated", "bad/zero.jpg": "zero-byte", "bad/text.jpg": "undecodable",
           "bad/corrupt.jpg": "undecodable", "bad/broken.dcm": "undecodable DICOM",
           "../outside.jpg": "escapes SOURCE", "nope/missing.jpg": "missing file", "": "empty"}
    rows += [{"path": p, "patient": "p9"} for p in bad]
    write_csv(src / "rows.csv", rows)
    return src, good, bad


def test_image_level_problems_are_skipped_with_reasons(messy, tmp_path):
    src, good, bad = messy
    out = tmp_path / "out"
    proc = run_cli("build", src, out, "--manifest", src / "rows.csv", "--patient-col", "patient")
    assert proc.returncode == 0
    assert f"{len(bad)} inputs skipped" in proc.stderr
    m = read_manifest(out)
    reasons = {s["source"] if s["source"] else "": s["reason"] for s in m["skipped"]}
    assert len(m["skipped"]) == len(bad)
    for source, expected in bad.items():
        key = source if source else "row 12"
        assert expected in reasons[key], (source, reasons[key])
    # Every valid image is in a shard, byte-for-byte (small images are kept untouched).
    stored = {img["source"]: s[img["member"]] for s in read_samples(out) for img in s["json"]["images"]}
    assert stored == {str(p.relative_to(src)): p.read_bytes() for p in good}
    # Every manifest row is accounted for exactly once.
    rows_in_shards = {img["row"] for s in read_samples(out) for img in s["json"]["images"]}
    rows_skipped = {s["row"] for s in m["skipped"]}
    assert rows_in_shards | rows_skipped == set(range(1, 13)) and not rows_in_shards & rows_skipped


def test_folder_mode_records_non_images(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg", 1)
    (src / "notes.txt").write_text("hello")
    (src / ".DS_Store").write_bytes(b"\0\1")
    out = tmp_path / "out"
    run_cli("build", src, out, "--quiet")
    m = read_manifest(out)
    assert [(s["source"], s["reason"]) for s in m["skipped"]] == [("notes.txt", "not an image file (extension '.txt')")]
    assert sum(s["images"] for s in m["splits"].values()) == 1


def _fails_before_work(args, out, needle):
    proc = run_cli(*args, check=False)
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("medssl-shard build: error: ") and needle in errors[0], proc.stderr
    assert not (out / "_build" / "plan.json.gz").exists() and not list(out.glob("*/shard-*.tar"))


def test_run_level_errors(messy, tmp_path):
    src, _, _ = messy
    out = tmp_path / "out"
    man = ["--manifest", src / "rows.csv"]
    _fails_before_work(["build", src, out, *man, "--patient-col", "subject"], out, "no column 'subject'")
    _fails_before_work(["build", src, out, *man, "--label-cols", "path,dx"], out, "no column 'dx'")
    _fails_before_work(["build", src, out, "--splits", "train=0.9,val=0.2"], out, "sum to 1")
    _fails_before_work(["build", src, out, "--splits", "train:0.9"], out, "NAME=FRACTION")
    _fails_before_work(["build", src, out, "--shard-size", "big"], out, "bad size")
    _fails_before_work(["build", src, out, "--patient-regex", "(a)(b)"], out, "exactly one capture group")
    _fails_before_work(["build", src, out, "--manifest", src / "absent.csv"], out, "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_before_work(["build", empty, out], out, "no usable images")
    _fails_before_work(["build", tmp_path / "does-not-exist", out], out, "not a folder")
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    _fails_before_work(["build", src, blocker / "sub", *man], blocker / "sub", "not writable")
    taken = tmp_path / "taken"
    (taken / "something").mkdir(parents=True)
    _fails_before_work(["build", src, taken, *man], taken, "not empty")


def test_rerun_with_other_options_is_refused(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.jpg", 1)
    out = tmp_path / "out"
    run_cli("build", src, out, "--quiet")
    proc = run_cli("build", src, out, "--max-side", "64", check=False)
    assert proc.returncode == 2 and "other options" in proc.stderr


def test_patient_regex_that_matches_nothing_names_the_paths_and_reasons(tmp_path):
    src = tmp_path / "src"
    layout = make_split_class_tree(src, patients=7)
    (src / "README.txt").write_text("not an image")
    out = tmp_path / "out"
    proc = run_cli("build", src, out, "--patient-regex", r"^(P\d+)/", "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    first, *rest = proc.stderr.rstrip("\n").splitlines()
    assert first.startswith("medssl-shard build: error: ") and ": error: " not in "".join(rest)
    # What it was matched against (paths relative to SOURCE, two real ones as examples) and what to fix.
    examples = sorted(layout)[:2]
    assert rf"--patient-regex '^(P\d+)/' matched none of the {len(layout)} image paths" in first
    assert "relative to SOURCE" in first and all(repr(e) in first for e in examples)
    assert "fix it so that its one group captures the patient id" in first
    # A short indented list of the skip reasons with their counts, commonest first.
    assert len(rest) == 2 and all(line.startswith("  ") for line in rest), rest
    assert rest[0].split()[:6] == [str(len(layout)), "path", "does", "not", "match", "--patient-regex"]
    assert rest[1].split()[:2] == ["1", "not"] and "'README.txt'" in rest[1]
    assert not (out / "_build" / "plan.json.gz").exists()


def test_manifest_is_byte_identical_across_reruns_with_a_corrupt_file(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        write_image(src / f"ok/{i}.jpg", i)
    (src / "bad").mkdir()
    (src / "bad/text.jpg").write_bytes(b"this is not an image at all\n" * 20)  # Pillow: cannot identify
    (src / "bad/noise.png").write_bytes(os.urandom(400))
    out = tmp_path / "out"
    run_cli("build", src, out, "--quiet")
    first = (out / "manifest.json").read_bytes()
    shutil.rmtree(out)
    run_cli("build", src, out, "--quiet")  # the same command again, from scratch
    assert (out / "manifest.json").read_bytes() == first
    reasons = {s["source"]: s["reason"] for s in read_manifest(out)["skipped"]}
    assert set(reasons) == {"bad/text.jpg", "bad/noise.png"}
    assert reasons["bad/text.jpg"] == "undecodable image: cannot identify image file"
    assert not any("0x" in r for r in reasons.values()), reasons
