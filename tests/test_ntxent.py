"""NT-Xent against hand-computed values and a plain per-row float64 reference (single process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import medssl_scale.losses.ntxent as ntxent_mod
from medssl_scale.losses import nt_xent

F64 = torch.float64


def reference_nt_xent(z1, z2, tau, patient=None, valid=None, exclude_same_patient=False):
    """The textbook loss, one query row at a time, in float64: mean over valid queries of
    logsumexp(allowed logits) - positive logit. Differentiable, so it also gives reference gradients."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).to(F64), dim=1)
    sample = list(range(b)) * 2
    ok = [True] * b if valid is None else [bool(v) for v in valid]
    losses, correct = [], []
    for i in range(2 * b):
        if not ok[sample[i]]:
            continue
        pos = (i + b) % (2 * b)
        allowed = []
        for j in range(2 * b):
            if j == i or not ok[sample[j]]:
                continue
            if (exclude_same_patient and int(patient[sample[j]]) == int(patient[sample[i]])
                    and sample[j] != sample[i]):
                continue
            allowed.append(j)
        logits = torch.stack([z[i] @ z[j] / tau for j in allowed])
        s_pos = z[i] @ z[pos] / tau
        losses.append(torch.logsumexp(logits, 0) - s_pos)
        others = [logits[t] for t, j in enumerate(allowed) if j != pos]
        correct.append(all(bool(s_pos > o) for o in others))
    return torch.stack(losses).mean(), sum(correct) / len(correct)


@pytest.fixture(params=["symmetric", "general"])
def path(request, monkeypatch):
    """Run a test through one of the two implementations only: the single-process symmetric one (the
    default with one process) or the general queries-vs-gathered-keys one (what each rank of a
    multi-process job runs); the other is made to fail if called."""

    def refuse(*args):
        raise AssertionError(f"the {request.param} path was requested")

    if request.param == "symmetric":
        monkeypatch.setattr(ntxent_mod._ChunkedNTXent, "apply", refuse)
    else:
        monkeypatch.setattr(ntxent_mod, "_FIXED_SHIFT_RANGE", {torch.float32: 0.0, torch.float64: 0.0})
        monkeypatch.setattr(ntxent_mod._SymmetricNTXent, "apply", refuse)
    return request.param


def _data(b, d, seed, dtype=F64, noise=0.7):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=F64) * 3
    z2 = z1 + noise * torch.randn(b, d, generator=g, dtype=F64)  # correlated views: a loss below chance
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()


def _loss_and_grads(fn, z1, z2):
    a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
    out = fn(a, b)
    loss = out.loss if hasattr(out, "loss") else out[0]
    loss.backward()
    return out, loss.detach(), a.grad, b.grad


def test_hand_computed_two_pairs(path):
    # Unit directions with known cosines: a.b = 0, a.a' = .6, a.b' = -.8, b.a' = .8, b.b' = .6, a'.b' = 0;
    # norms 3, 0.5, 2, 7 check the normalization. tau = 0.5, so logits are 2 * cosine.
    z1 = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=F64)
    z2 = torch.tensor([[1.2, 1.6], [-5.6, 4.2]], dtype=F64)
    l_a = math.log(math.exp(1.2) + math.exp(0.0) + math.exp(-1.6)) - 1.2    # query a:  pos a', negs b, b'
    l_b = math.log(math.exp(1.2) + math.exp(0.0) + math.exp(1.6)) - 1.2     # query b:  pos b', negs a, a'
    l_a2 = math.log(math.exp(1.2) + math.exp(1.6) + math.exp(0.0)) - 1.2    # query a': pos a,  negs b, b'
    l_b2 = math.log(math.exp(1.2) + math.exp(-1.6) + math.exp(0.0)) - 1.2   # query b': pos b,  negs a, a'
    out = nt_xent(z1, z2, temperature=0.5)
    expected = (l_a + l_b + l_a2 + l_b2) / 4
    assert out.loss.item() == pytest.approx(expected, abs=1e-14)
    assert out.global_loss.item() == pytest.approx(expected, abs=1e-14)
    assert out.accuracy.item() == 0.5          # a and b' rank their positive first; b and a' do not
    assert out.num_valid.item() == 4
    # Both pairs of one patient: with the mask every query keeps only its positive, so log(e^s) - s = 0.
    same = nt_xent(z1, z2, temperature=0.5, patient=torch.tensor([5, 5]), exclude_same_patient=True)
    assert same.loss.item() == pytest.approx(0.0, abs=1e-14)
    assert same.accuracy.item() == 1.0


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 11, 24, 1000, None])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_reference(chunk, masked, path):
    b = 12
    z1, z2 = _data(b, 6, seed=1, noise=4.0)     # weakly related views, so that top-1 accuracy is not 1
    patient = torch.tensor([1, 2, 3, 1, 4, 5, 2, 6, 7, 1, 8, 9])
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool) if masked else None
    kw = dict(patient=patient, valid=valid, exclude_same_patient=masked)
    out, loss, g1, g2 = _loss_and_grads(lambda a, c: nt_xent(a, c, 0.2, chunk_size=chunk, **kw), z1, z2)
    (ref, ref_acc), rloss, r1, r2 = _loss_and_grads(lambda a, c: reference_nt_xent(a, c, 0.2, **kw), z1, z2)
    torch.testing.assert_close(loss, rloss, rtol=0, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=0, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=0, atol=1e-12)
    assert 0.2 < ref_acc < 0.9 and out.accuracy.item() == pytest.approx(ref_acc, abs=1e-15)


@pytest.mark.parametrize("rows", [3, 16])
def test_autograd_functions_with_arbitrary_upstream_weights(rows):
    """nt_xent only ever weights the per-query losses uniformly; the Functions' backward must be right
    for any weights (gradcheck against finite differences, float64)."""
    g = torch.Generator().manual_seed(10)
    n, d = 8, 4
    patient = torch.tensor([1, 2, 1, 3, 1, 2, 1, 3])                    # per query = per key here
    sample = torch.arange(n) % (n // 2)
    excl_q, excl_k = ntxent_mod._same_patient_pairs(patient, sample, patient, sample, cap=1000)
    mask_q, mask_k = torch.cat([torch.arange(n), excl_q]), torch.cat([torch.arange(n), excl_k])
    pos = (torch.arange(n) + n // 2) % n
    w = torch.randn(n, generator=g, dtype=F64)
    x = (0.5 * torch.randn(n, d, generator=g, dtype=F64)).requires_grad_()
    sym = ntxent_mod._SymmetricNTXent.apply
    assert torch.autograd.gradcheck(lambda x: (sym(x, 2.0, pos, mask_q, mask_k, None, rows)[0] * w).sum(), (x,))
    # The general Function with unrelated queries and keys, positives anywhere.
    q = (0.5 * torch.randn(5, d, generator=g, dtype=F64)).requires_grad_()
    k = (0.5 * torch.randn(9, d, generator=g, dtype=F64)).requires_grad_()
    gen = ntxent_mod._ChunkedNTXent.apply
    pos_q = torch.tensor([8, 0, 3, 3, 5])
    mq, mk = torch.tensor([0, 1, 1, 4]), torch.tensor([2, 2, 7, 0])
    assert torch.autograd.gradcheck(lambda q, k: (gen(q, k, 2.0, pos_q, mq, mk, None, rows)[0] * w[:5]).sum(),
                                    (q, k))


def test_unique_patients_mask_changes_nothing():
    z1, z2 = _data(10, 5, seed=2)
    plain = nt_xent(z1, z2, 0.1).loss
    masked = nt_xent(z1, z2, 0.1, patient=torch.arange(100, 110), exclude_same_patient=True).loss
    torch.testing.assert_close(masked, plain, rtol=0, atol=1e-14)


def test_repeated_patients_mask_removes_false_negatives(path):
    z1, z2 = _data(8, 5, seed=3)
    patient = torch.tensor([4, 4, 9, 9, 9, 1, 2, 3])
    plain = nt_xent(z1, z2, 0.1, patient=patient).loss
    masked = nt_xent(z1, z2, 0.1, patient=patient, exclude_same_patient=True).loss
    ref, _ = reference_nt_xent(z1, z2, 0.1, patient=patient, exclude_same_patient=True)
    torch.testing.assert_close(masked, ref, rtol=0, atol=1e-12)
    assert abs(masked.item() - plain.item()) > 1e-3      # the mask really did something


def test_dense_exclusion_fallback_matches(monkeypatch, path):
    z1, z2 = _data(9, 4, seed=4)
    patient = torch.tensor([1, 1, 1, 2, 2, 3, 3, 3, 3])
    kw = dict(patient=patient, exclude_same_patient=True, chunk_size=4)
    _, sparse, s1, s2 = _loss_and_grads(lambda a, c: nt_xent(a, c, 0.3, **kw), z1, z2)
    monkeypatch.setattr(ntxent_mod, "_PAIR_CAP_PER_ROW", 0)   # too many pairs: per-chunk dense masks
    _, dense, d1, d2 = _loss_and_grads(lambda a, c: nt_xent(a, c, 0.3, **kw), z1, z2)
    (ref, _), _, r1, r2 = _loss_and_grads(lambda a, c: reference_nt_xent(a, c, 0.3, patient=patient,
                                                                          exclude_same_patient=True), z1, z2)
    for got in (sparse, dense):
        torch.testing.assert_close(got, ref.detach(), rtol=0, atol=1e-12)
    for got in (s1, d1):
        torch.testing.assert_close(got, r1, rtol=0, atol=1e-12)
    for got in (s2, d2):
        torch.testing.assert_close(got, r2, rtol=0, atol=1e-12)


def test_invalid_entries_are_excluded_exactly(path):
    z1, z2 = _data(10, 6, seed=5)
    valid = torch.tensor([1, 0, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    with torch.no_grad():    # padding content must not matter: huge values in some, zeros in others
        z1[1] = 1e6
        z2[6] = 0.0
        z1[9] = -3e5
    out, loss, g1, g2 = _loss_and_grads(lambda a, c: nt_xent(a, c, 0.1, valid=valid, chunk_size=3), z1, z2)
    (ref, _), rloss, r1, r2 = _loss_and_grads(lambda a, c: reference_nt_xent(a, c, 0.1), z1[valid], z2[valid])
    torch.testing.assert_close(loss, rloss, rtol=0, atol=1e-12)
    torch.testing.assert_close(g1[valid], r1, rtol=0, atol=1e-12)
    torch.testing.assert_close(g2[valid], r2, rtol=0, atol=1e-12)
    assert torch.count_nonzero(g1[~valid]) == 0 and torch.count_nonzero(g2[~valid]) == 0
    assert out.num_valid.item() == 14


def test_all_invalid_gives_zero_loss_and_gradient(path):
    z1, z2 = _data(3, 4, seed=6)
    out, loss, g1, g2 = _loss_and_grads(lambda a, c: nt_xent(a, c, valid=torch.zeros(3, dtype=torch.bool)),
                                        z1, z2)
    assert loss.item() == 0.0 and out.num_valid.item() == 0
    assert torch.count_nonzero(g1) == 0 and torch.count_nonzero(g2) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_use_float32_logits_and_do_not_overflow(dtype, monkeypatch, path):
    seen = []
    real = ntxent_mod._chunk_logits

    def spy(q, k_t, out):
        seen.append((q.dtype, k_t.dtype, out.dtype))
        return real(q, k_t, out)

    monkeypatch.setattr(ntxent_mod, "_chunk_logits", spy)
    z1, z2 = _data(16, 32, seed=7)
    # Norms near fp16's limit: squaring them in the input dtype would overflow to inf.
    big1 = (z1.detach() * 2e3).clamp(-6e4, 6e4).to(dtype).requires_grad_()
    big2 = (z2.detach() * 2e3).clamp(-6e4, 6e4).to(dtype).requires_grad_()
    out = nt_xent(big1, big2, 0.1, chunk_size=5)
    out.loss.backward()
    ref, _ = reference_nt_xent(big1.detach(), big2.detach(), 0.1)   # same rounded inputs, in float64
    assert seen and all(d == (torch.float32,) * 3 for d in seen)   # forward and backward chunks
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert big1.grad.dtype == dtype and torch.isfinite(big1.grad).all() and torch.isfinite(big2.grad).all()


def test_autocast_does_not_lower_logit_precision(path):
    z1, z2 = _data(16, 32, seed=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nt_xent(z1, z2, 0.05)
    ref, _ = reference_nt_xent(z1.detach(), z2.detach(), 0.05)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-5)   # bf16 logits miss by ~1e-2


@pytest.mark.parametrize("tau", [0.005, 0.01])
def test_small_temperature_is_exact_in_float32(tau, monkeypatch):
    """2/tau beyond float32's exp range for a fixed shift: the automatic choice must be the max-shifted
    general path, and it must stay accurate."""
    calls = []
    real = ntxent_mod._ChunkedNTXent.apply
    monkeypatch.setattr(ntxent_mod._ChunkedNTXent, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(9)
    # Nearly orthogonal embeddings (cosines around +-0.03): every logit of a row lies far below 1/tau, where a
    # fixed shift by 1/tau would underflow float32 to zero.
    z1, z2 = torch.randn(24, 1024, generator=g), torch.randn(24, 1024, generator=g)
    patient = torch.arange(24) % 7
    out = nt_xent(z1, z2, tau, patient=patient, exclude_same_patient=True, chunk_size=5)
    ref, ref_acc = reference_nt_xent(z1, z2, tau, patient=patient, exclude_same_patient=True)
    assert calls and ref.item() > 1.0
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=0)
    assert out.accuracy.item() == pytest.approx(ref_acc)


def test_user_errors_are_one_clear_line():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape|one shape"):
        nt_xent(z, torch.randn(5, 3))
    with pytest.raises(ValueError, match="needs the patient"):
        nt_xent(z, z, exclude_same_patient=True)
    with pytest.raises(ValueError, match="valid must have shape"):
        nt_xent(z, z, valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        nt_xent(z, z, chunk_size=0)
