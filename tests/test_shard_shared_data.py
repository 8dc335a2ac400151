"""Acceptance on the real images in ../shared/data (skipped cleanly when that folder is absent)."""

from __future__ import annotations

import collections
import csv

import pytest

from shardtools import SHARED_DATA, read_manifest, read_samples, run_cli

pytestmark = pytest.mark.shared_data
COVID = SHARED_DATA / "covid_cxr"
HAM = SHARED_DATA / "ham10000_subset"


@pytest.fixture(scope="module")
def covid_build(tmp_path_factory):
    if not (COVID / "metadata.csv").exists():
        pytest.skip("../shared/data/covid_cxr is absent")
    out = tmp_path_factory.mktemp("covid") / "shards"
    run_cli("build", COVID, out, "--manifest", COVID / "metadata.csv", "--image-col", "path",
            "--patient-col", "patient_id", "--label-cols", "finding", "--shard-size", "8MB", "--quiet")
    with open(COVID / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows


def test_covid_every_row_accounted_for(covid_build):
    out, rows = covid_build
    m = read_manifest(out)
    in_shards = [img["row"] for s in read_samples(out) for img in s["json"]["images"]]
    skipped = [s["row"] for s in m["skipped"]]
    dropped = [d["row"] for dup in m["duplicates"] if dup["kind"] == "same_file" for d in dup["dropped"]]
    everything = in_shards + skipped + dropped
    assert len(rows) == 653
    assert sorted(everything) == list(range(1, len(rows) + 1))  # each row exactly once
    # Rows in shards carry the row's own path, patient and label.
    for s in read_samples(out):
        for img in s["json"]["images"]:
            row = rows[img["row"] - 1]
            assert img["source"] == row["path"] and s["json"]["patient_id"] == row["patient_id"]
            assert img["labels"]["finding"] == (row["finding"] or None)


def test_covid_no_patient_in_two_splits(covid_build):
    out, rows = covid_build
    splits_of = collections.defaultdict(set)
    for s in read_samples(out):
        splits_of[s["json"]["patient_id"]].add(s["split"])
    assert all(len(v) == 1 for v in splits_of.values())
    # No image file in two splits either, even those listed under two patients.
    split_of_file = collections.defaultdict(set)
    for s in read_samples(out):
        for img in s["json"]["images"]:
            split_of_file[img["source"]].add(s["split"])
    assert all(len(v) == 1 for v in split_of_file.values())


def test_covid_reports_the_five_files_under_two_patients(covid_build):
    out, rows = covid_build
    patients_of = collections.defaultdict(set)
    for r in rows:
        patients_of[r["path"]].add(r["patient_id"])
    expected = {p: ps for p, ps in patients_of.items() if len(ps) > 1}
    assert len(expected) == 5
    same_file = {d["source"]: set(d["patients"]) for d in read_manifest(out)["duplicates"] if d["kind"] == "same_file"}
    assert same_file == expected


def test_ham10000_labels_match_metadata(tmp_path):
    if not (HAM / "metadata.csv").exists():
        pytest.skip("../shared/data/ham10000_subset is absent")
    out = tmp_path / "ham"
    run_cli("build", HAM, out, "--manifest", HAM / "metadata.csv", "--patient-col", "lesion_id",
            "--label-cols", "dx,localization", "--quiet")
    with open(HAM / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = read_manifest(out)["labels"]
    assert labels["dx"]["counts"] == dict(collections.Counter(r["dx"] for r in rows))
    assert sum(s["images"] for s in read_manifest(out)["splits"].values()) == len(rows)
