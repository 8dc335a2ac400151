"""Collapse statistics against direct numpy computations, and on a collapsed (constant) encoder."""

import math

import numpy as np
import pytest
import torch

from medssl_scale.train.collapse import collapse_stats


def _reference(z1: np.ndarray, z2: np.ndarray) -> dict:
    a = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    b = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    both = np.concatenate([a, b])
    n = len(a)
    terms = [math.exp(-2 * float(np.sum((both[i] - both[j]) ** 2)))
             for i in range(2 * n) for j in range(2 * n) if i != j]
    negs = [float(a[i] @ b[j]) for i in range(n) for j in range(n) if i != j]
    return {"embed_std": float(np.mean(np.std(both, axis=0))),
            "align": float(np.mean([np.sum((a[i] - b[i]) ** 2) for i in range(n)])),
            "uniform": math.log(sum(terms) / len(terms)),
            "pos_cos": float(np.mean([a[i] @ b[i] for i in range(n)])), "neg_cos": float(np.mean(negs))}


@pytest.mark.parametrize("chunk", [1024, 3])  # one Gram block, and blocks that cut rows mid-batch
def test_statistics_equal_a_direct_computation_and_ignore_padding(chunk, monkeypatch):
    monkeypatch.setattr("medssl_scale.train.collapse.CHUNK", chunk)
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    valid = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    got = collapse_stats(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32),
                         torch.tensor(valid))
    want = _reference(z1[valid], z2[valid])
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_a_constant_encoder_is_flagged_by_zero_spread():
    z = torch.ones(16, 8)
    s = collapse_stats(z, z)
    assert s["embed_std"] == pytest.approx(0.0, abs=1e-12)
    assert s["align"] == pytest.approx(0.0, abs=1e-12) and s["uniform"] == pytest.approx(0.0, abs=1e-12)
    assert s["pos_cos"] == pytest.approx(1.0) and s["neg_cos"] == pytest.approx(1.0)
    spread = collapse_stats(torch.randn(1500, 8, generator=torch.Generator().manual_seed(1)),
                            torch.randn(1500, 8, generator=torch.Generator().manual_seed(2)))
    assert spread["embed_std"] == pytest.approx(1 / math.sqrt(8), rel=0.02)  # a spread representation
