"""Label fractions and validation splits by patient: exact counts, stratified, patient-disjoint, seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl_scale.evaluate.errors import FractionError
from medssl_scale.evaluate.fractions import NONE_STRATUM, sample_label_fraction, split_validation

SEEDS = range(6)


def _pool(seed=0, n_patients=80, weights=(0.5, 0.3, 0.15, 0.05)):
    """Patients with 1-5 images, one diagnosis each (drawn with the class weights), a few with a stray label."""
    rng = np.random.default_rng(seed)
    pids, labels = [], []
    for i in range(n_patients):
        cls = rng.choice(len(weights), p=weights)
        n = int(rng.integers(1, 6))
        lab = [cls] * n
        if n >= 3 and rng.random() < 0.3:
            lab[-1] = int(rng.integers(0, len(weights)))  # a minority label; the mode stays cls
        pids += [f"p{i:03d}"] * n
        labels += lab
    perm = rng.permutation(len(pids))  # images arrive in no particular order
    return np.array(pids)[perm], np.array(labels, dtype=np.int64)[perm]


def _mode_class(pids, labels):
    """Each patient's most frequent label, ties to the smaller class (computed with plain Python)."""
    out = {}
    for q in set(pids.tolist()):
        labs = labels[pids == q].tolist()
        out[q] = min(set(labs), key=lambda c: (-labs.count(c), c))
    return out


def _check_sample(s, pids, labels):
    chosen = set(s.patients)
    # a patient's images are in or out together, and indices are exactly the chosen patients' images
    assert s.indices.tolist() == [i for i in range(len(pids)) if pids[i] in chosen]
    assert set(pids[s.indices].tolist()) == chosen
    assert s.n_patients == len(chosen) and s.n_images == s.indices.size
    for c in range(labels.max() + 1):
        imgs = s.indices[labels[s.indices] == c]
        assert s.per_class[str(c)]["images"] == imgs.size
        assert s.per_class[str(c)]["patients"] == len(set(pids[imgs].tolist()))


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_label_fraction_exact_stratified_patient_disjoint(fraction):
    pids, labels = _pool()
    mode = _mode_class(pids, labels)
    n_patients = len(mode)
    strata = {c: sum(1 for m in mode.values() if m == c) for c in range(4)}
    for seed in SEEDS:
        s = sample_label_fraction(pids, labels, label_fraction=fraction, seed=seed)
        _check_sample(s, pids, labels)
        assert s.n_patients == math.floor(fraction * n_patients + 0.5)
        assert s.n_pool_patients == n_patients and s.n_pool_images == len(pids)
        for c, size in strata.items():
            drawn = sum(1 for q in s.patients if mode[q] == c)
            assert s.per_class[str(c)]["stratum_patients"] == drawn
            assert drawn >= 1                                     # every class keeps a patient
            assert abs(drawn - fraction * size) <= 1.5            # proportional, up to rounding and the floor of 1
        # the rest of the split is untouched: the complement is the other patients' images
        rest = np.setdiff1d(np.arange(len(pids)), s.indices)
        assert not set(pids[rest].tolist()) & set(s.patients)
    assert sample_label_fraction(pids, labels, label_fraction=1.0).n_images == len(pids)


def test_label_fraction_seeded_and_independent_of_image_order():
    pids, labels = _pool(seed=3)
    a = sample_label_fraction(pids, labels, label_fraction=0.2, seed=5)
    b = sample_label_fraction(pids, labels, label_fraction=0.2, seed=5)
    c = sample_label_fraction(pids, labels, label_fraction=0.2, seed=6)
    assert a.patients == b.patients and a.patients != c.patients
    perm = np.random.default_rng(0).permutation(len(pids))
    d = sample_label_fraction(pids[perm], labels[perm], label_fraction=0.2, seed=5)
    assert d.patients == a.patients and d.per_class == a.per_class


@pytest.mark.parametrize("k", [1, 3, 8])
def test_labels_per_class(k):
    pids, labels = _pool(seed=1)
    mode = _mode_class(pids, labels)
    for seed in SEEDS:
        s = sample_label_fraction(pids, labels, labels_per_class=k, seed=seed)
        _check_sample(s, pids, labels)
        # the documented draw: strata in class order, each stratum's patients (sorted by id) permuted by
        # default_rng(seed), taken until the class has >= k images among them
        rng = np.random.default_rng(seed)
        expected = []
        for c in range(4):
            stratum = sorted(q for q in mode if mode[q] == c)
            count = 0
            for j in rng.permutation(len(stratum)):
                if count >= k:
                    break
                expected.append(stratum[j])
                count += int(np.sum((pids == stratum[j]) & (labels == c)))
            assert count >= k or len(stratum) == sum(mode[q] == c for q in expected)
            assert 1 <= s.per_class[str(c)]["stratum_patients"] <= k  # each brings >= 1 image of its class
        assert s.patients == tuple(sorted(expected))


def test_multilabel_fraction_keeps_a_positive_patient_of_every_label():
    rng = np.random.default_rng(2)
    pids = np.repeat([f"q{i:03d}" for i in range(120)], rng.integers(1, 4, 120))
    prevalence = np.array([0.3, 0.1, 0.02, 0.4])
    labels = (rng.random((len(pids), 4)) < prevalence).astype(float)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    positive_patients = {l: {q for q in set(pids.tolist()) if np.nansum(labels[pids == q, l]) > 0} for l in range(4)}
    assert all(positive_patients.values())
    for seed in SEEDS:
        s = sample_label_fraction(pids, labels, label_fraction=0.05, seed=seed, names=["a", "b", "c", "d"])
        assert s.n_patients == math.floor(0.05 * 120 + 0.5)
        assert set(pids[s.indices].tolist()) == set(s.patients)
        for l, name in enumerate("abcd"):
            assert set(s.patients) & positive_patients[l], name
            assert s.per_class[name]["images"] == int(np.nansum(labels[s.indices, l]))
        assert s.per_class[NONE_STRATUM]["stratum_patients"] == sum(
            1 for q in s.patients if not any(q in positive_patients[l] for l in range(4)))


def test_fraction_too_small_is_one_clear_error():
    pids, labels = _pool()
    with pytest.raises(FractionError) as err:
        sample_label_fraction(pids, labels, label_fraction=0.02, seed=0)  # 2 of 80 patients, 4 classes
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert "keeps 2 of 80" in msg and "4 classes" in msg
    least = float(msg.split("label_fraction >= ")[1].split()[0])
    sample_label_fraction(pids, labels, label_fraction=least, seed=0)  # the suggested fraction works


@pytest.mark.parametrize("kwargs", [{}, {"label_fraction": 0.5, "labels_per_class": 2}, {"label_fraction": 0.0},
                                    {"label_fraction": 1.5}, {"labels_per_class": 0}, {"labels_per_class": 1.5}])
def test_bad_arguments_are_one_line(kwargs):
    pids, labels = _pool()
    with pytest.raises(FractionError) as err:
        sample_label_fraction(pids, labels, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5])
def test_validation_split_grouped_seeded(val_fraction):
    pids, labels = _pool(seed=4)
    mode = _mode_class(pids, labels)
    for seed in SEEDS:
        sp = split_validation(pids, labels, val_fraction=val_fraction, seed=seed)
        train_p, val_p = set(pids[sp.train].tolist()), set(pids[sp.val].tolist())
        assert not train_p & val_p and train_p | val_p == set(mode)
        assert sorted(np.concatenate([sp.train, sp.val]).tolist()) == list(range(len(pids)))
        assert sp.n_val_patients == len(val_p) == math.floor(val_fraction * len(mode) + 0.5)
        assert sp.n_train_patients == len(train_p)
        for c in range(4):
            assert any(mode[q] == c for q in train_p)             # every class keeps a training patient
    a = split_validation(pids, labels, val_fraction=0.2, seed=1)
    b = split_validation(pids, labels, val_fraction=0.2, seed=1)
    assert a.val.tolist() == b.val.tolist()


def test_validation_split_errors():
    pids = np.array(["a", "b", "c", "d"])
    labels = np.array([0, 1, 2, 3])
    with pytest.raises(FractionError, match="only 0 of 4"):
        split_validation(pids, labels, val_fraction=0.25)
    with pytest.raises(FractionError, match="holds out none"):
        split_validation(np.array(["a", "b", "c"]), np.array([0, 0, 0]), val_fraction=0.1)
