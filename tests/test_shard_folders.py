"""Folder layouts: labels and splits taken from folder levels; a patient under two split folders refused."""

from __future__ import annotations

import collections

from shardtools import make_split_class_tree, read_manifest, read_samples, run_cli, write_image

PATIENT = r"/(pat\d+)_v\d+\.png$"


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if ": error: " in line]


def test_split_and_class_from_folder_levels(tmp_path):
    src = tmp_path / "src"
    layout = make_split_class_tree(src, patients=14)
    out = tmp_path / "out"
    run_cli("build", src, out, "--patient-regex", PATIENT, "--split-from-folder", "1", "--class-from-folder", "2",
            "--images-per-sample", "2", "--quiet")
    stored = {}
    for s in read_samples(out):
        for img in s["json"]["images"]:
            stored[img["source"]] = (s["split"], s["json"]["split"], img["labels"], s["json"]["patient_id"])
    assert set(stored) == set(layout)  # nothing valid lost
    for rel, want in layout.items():
        tar_split, json_split, labels, patient = stored[rel]
        assert tar_split == json_split == want["split"] and patient == want["patient"]
        assert labels == {"class": want["class"]}
    m = read_manifest(out)
    assert list(m["splits"]) == sorted({w["split"] for w in layout.values()})
    patients_per_split = collections.Counter()
    for split in {w["split"] for w in layout.values()}:
        patients_per_split[split] = len({w["patient"] for w in layout.values() if w["split"] == split})
        assert m["splits"][split]["patients"] == patients_per_split[split]
    counts = collections.Counter(w["class"] for w in layout.values())
    assert m["labels"]["class"] == {"vocabulary": sorted(counts), "counts": dict(sorted(counts.items())), "missing": 0}
    # -1 counts from the image: the folder holding it is the class folder here, so the bytes are the same.
    out2 = tmp_path / "out2"
    run_cli("build", src, out2, "--patient-regex", PATIENT, "--split-from-folder", "1", "--class-from-folder", "-1",
            "--images-per-sample", "2", "--quiet")
    assert [(s["key"], s["json"]) for s in read_samples(out2)] == [(s["key"], s["json"]) for s in read_samples(out)]


def test_patient_under_two_split_folders_is_refused(tmp_path):
    src = tmp_path / "src"
    make_split_class_tree(src, patients=9)
    write_image(src / "val" / "COVID" / "pat000_v9.png", 5)  # pat000 lives under train/
    write_image(src / "test" / "NORMAL" / "pat004_v9.png", 6)  # and pat004 too
    out = tmp_path / "out"
    proc = run_cli("build", src, out, "--patient-regex", PATIENT, "--split-from-folder", "1", "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = _error_lines(proc)
    assert len(errors) == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "'pat000'" in errors[0] and "and 1 more patient" in errors[0]
    assert "'train' (train/" in errors[0] and "'val' (val/COVID/pat000_v9.png)" in errors[0]
    assert not (out / "_build" / "plan.json.gz").exists()


def test_folder_level_mistakes_are_one_line(tmp_path):
    src = tmp_path / "src"
    make_split_class_tree(src, patients=3)
    out = tmp_path / "out"
    for args, needle in [(["--class-from-folder", "0"], "not a folder level"),
                         (["--split-from-folder", "x"], "not a folder level"),
                         (["--split-from-folder", "1", "--splits", "train=1"], "--splits and --split-from-folder"),
                         (["--split-from-folder", "1", "--class-from-folder", "1"], "different levels"),
                         (["--class-from-folder", "3"], "--class-from-folder 3 names a folder level")]:
        proc = run_cli("build", src, out, *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len([line for line in proc.stderr.splitlines() if "error: " in line]) == 1, (args, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)
        assert not (out / "_build" / "plan.json.gz").exists()
