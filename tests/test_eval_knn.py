"""Cosine kNN with exp(sim / T) weighted voting against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medssl_scale.evaluate.errors import EvaluationError
from medssl_scale.evaluate.knn import knn_scores, sweep_knn


# tiny matrices: intra-op threads only add wake-up latency (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _features(seed=0, m=120, n=40, d=16, c=4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    y = rng.integers(0, c, m)
    train = centers[y] + rng.normal(size=(m, d)) * 1.5
    yq = rng.integers(0, c, n)
    query = (centers[yq] + rng.normal(size=(n, d)) * 1.5) * rng.uniform(0.1, 10.0, (n, 1))  # norms vary
    return train, y, query, yq


def _numpy_knn(train, y, query, k, t, c):
    """Per query: cosine similarity to every training feature, the k largest, votes exp(s / T) / sum."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(query), c))
    for i, q in enumerate(query):
        sim = a @ (q / np.linalg.norm(q))
        nn = np.argsort(-sim, kind="stable")[:k]
        for j in nn:
            out[i, y[j]] += np.exp(sim[j] / t)
        out[i] /= np.exp(sim[nn] / t).sum()
    return out


@pytest.mark.parametrize("k,t", [(1, 0.07), (5, 0.07), (20, 0.5), (200, 0.1)])
def test_knn_equals_numpy(k, t):
    train, y, query, _ = _features()
    got = knn_scores(torch.from_numpy(train), torch.from_numpy(y), torch.from_numpy(query), k=k,
                     temperature=t, num_classes=5, chunk_size=7)
    ref = _numpy_knn(train, y, query, min(k, len(train)), t, 5)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), 1.0, rtol=1e-12)
    assert (got[:, 4] == 0).all()  # a class with no training feature gets no vote


def test_knn_float32_features_and_unchunked():
    train, y, query, _ = _features(seed=1)
    ref = _numpy_knn(train, y, query, 10, 0.07, 4)
    got = knn_scores(torch.from_numpy(train).float(), y, torch.from_numpy(query).float(), k=10)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)


def test_knn_multilabel_masks_unknown_neighbour_labels():
    rng = np.random.default_rng(2)
    train, _, query, _ = _features(seed=2)
    y = (rng.random((len(train), 3)) < 0.4).astype(float)
    y[rng.random(y.shape) < 0.3] = np.nan
    y[:, 2] = np.nan
    y[:3, 2] = 1.0  # label 2: only three known neighbours in the whole set
    k, t = 8, 0.1
    got = knn_scores(train, y, query, task="multilabel", k=k, temperature=t).numpy()
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    for i, q in enumerate(query):
        sim = a @ (q / np.linalg.norm(q))
        nn = np.argsort(-sim, kind="stable")[:k]
        for l in range(3):
            known = [j for j in nn if not np.isnan(y[j, l])]
            if known:
                w = np.exp(sim[known] / t)
                expected = float(np.sum(w * y[known, l]) / w.sum())
            else:  # no known neighbour: the training prevalence
                expected = float(np.nanmean(y[:, l]))
            assert got[i, l] == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_sweep_knn_selects_on_validation():
    train, y, query, yq = _features(seed=3, n=60)
    sweep = sweep_knn(train, y, query, yq, ks=(1, 5, 20), temperatures=(0.05, 0.5))
    assert len(sweep.table) == 6
    for row in sweep.table:
        scores = _numpy_knn(train, y, query, row["k"], row["temperature"], 4)
        assert row["accuracy"] == pytest.approx(np.mean(scores.argmax(1) == yq), abs=1e-12)
    best = max(row["accuracy"] for row in sweep.table)
    first = next(row for row in sweep.table if row["accuracy"] == best)
    assert (sweep.k, sweep.temperature, sweep.value) == (first["k"], first["temperature"], best)


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k must be"), ({"temperature": 0.0}, "temperature must be"), ({"num_classes": 2}, "out of range"),
    ({"task": "ranking"}, "task must be"),
])
def test_bad_input_is_one_line(kwargs, match):
    train, y, query, _ = _features()
    with pytest.raises(EvaluationError, match=match) as err:
        knn_scores(train, y, query, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(EvaluationError, match="dimensions"):
        knn_scores(train, y, query[:, :3])
