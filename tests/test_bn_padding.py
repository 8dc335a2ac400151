"""Padding never enters BatchNorm: a padded batch gives its valid rows exactly what the valid rows alone get.

The reference is plain nn.BatchNorm (and the unconverted model) run on the valid rows only, in float64,
in one process; the masked modules run on padded batches in 1 and 2 gloo processes.
"""

import copy
import multiprocessing
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medssl_scale.distributed.batchnorm import (convert_to_global_bn, convert_to_masked_bn, make_global_bn,
                                                set_batch_mask, GlobalSyncBatchNorm)
from medssl_scale.losses.ntxent import nt_xent
from medssl_scale.models import ContrastiveModel, ProjectionHead, build_backbone

TOL = dict(rtol=0, atol=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    ref = nn.BatchNorm2d(3, momentum=0.1).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        ref.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    return ref


def _padded(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x's rows where valid, zeros elsewhere (what the loaders emit for padding)."""
    out = torch.zeros((valid.numel(), *x.shape[1:]), dtype=x.dtype)
    out[valid] = x
    return out


def _check_bn(rank: int, world: int, global_stats: bool) -> None:
    """Two training steps of a masked BN on padded per-rank batches against plain BN on the valid rows."""
    per_rank_valid = [torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool),
                      torch.tensor([0, 1, 1, 0, 0, 0], dtype=torch.bool)][:world]
    counts = [int(v.sum()) for v in per_rank_valid]
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    ref = _bn_case(3)
    ours = copy.deepcopy(ref)
    ours = convert_to_global_bn(ours) if global_stats else convert_to_masked_bn(ours)
    valid = per_rank_valid[rank]
    for step in range(2):
        g = torch.Generator().manual_seed(50 + step)
        x_all = torch.randn(sum(counts), 3, 4, 4, generator=g, dtype=torch.float64) * 3 + 7
        target = torch.randn(sum(counts), 3, 4, 4, generator=g, dtype=torch.float64)
        # Without global statistics each rank's reference is its own valid rows.
        xr = (x_all if global_stats else x_all[lo:hi]).clone().requires_grad_()
        xp = _padded(x_all[lo:hi], valid).requires_grad_()
        ref.zero_grad(), ours.zero_grad()
        set_batch_mask(ours, valid)
        y_ref, y = ref(xr), ours(xp)
        mine = slice(lo, hi) if global_stats else slice(None)
        torch.testing.assert_close(y[valid], y_ref[mine], **TOL)
        (y_ref * (target if global_stats else target[lo:hi])).sum().backward()
        (y[valid] * target[lo:hi]).sum().backward()
        torch.testing.assert_close(xp.grad[valid], xr.grad[mine], **TOL)
        assert float(xp.grad[~valid].abs().max()) == 0.0
        for p, p_ref in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            grad = p.grad.clone()
            if global_stats and world > 1:
                dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad, **TOL)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **TOL)


def _tiny_model() -> ContrastiveModel:
    torch.manual_seed(0)
    backbone = build_backbone(18, small_input=True, zero_init_residual=False)
    return ContrastiveModel(backbone, ProjectionHead(backbone.feature_dim, 32, 16)).double()


def _model_case(rank: int, world: int):
    """Per-rank padded batches of a ResNet-18 (the loader's last batch of an epoch) and the reference."""
    g = torch.Generator().manual_seed(11)
    valid_all = [torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool),
                 torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)][:world]
    n = sum(int(v.sum()) for v in valid_all)
    v1 = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    v2 = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    patient = torch.arange(n)
    counts = [int(v.sum()) for v in valid_all]
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    return valid_all[rank], v1, v2, patient, lo, hi


def _model_grads(model, v1, v2, patient, valid, mask_bn: bool):
    model.zero_grad()
    if mask_bn:
        set_batch_mask(model, torch.cat([valid, valid]))
    _, z = model(torch.cat([v1, v2]))
    z1, z2 = z.chunk(2)
    out = nt_xent(z1, z2, 0.1, patient=patient, valid=valid, exclude_same_patient=True)
    out.loss.backward()
    return z, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _model_reference(world: int):
    """One process, plain BN, the valid rows only (call it before any process group exists)."""
    _, v1, v2, patient, _, _ = _model_case(0, world)
    reference = _tiny_model()
    return (reference, *_model_grads(reference, v1, v2, patient, None, mask_bn=False))


def _check_model(rank: int, world: int, ref) -> None:
    reference, ref_z, ref_grads = ref
    valid, v1, v2, patient, lo, hi = _model_case(rank, world)
    ours = _tiny_model()
    ours = make_global_bn(ours, "cpu") if world > 1 else convert_to_masked_bn(ours)
    b = valid.numel()
    pad = lambda t: _padded(t[lo:hi], valid)  # noqa: E731
    pat = torch.full((b,), -1, dtype=torch.int64)
    pat[valid] = patient[lo:hi]
    z, grads = _model_grads(ours, pad(v1), pad(v2), pat, valid, mask_bn=True)
    n = ref_z.shape[0] // 2
    torch.testing.assert_close(z[:b][valid], ref_z[:n][lo:hi], rtol=0, atol=1e-10)
    torch.testing.assert_close(z[b:][valid], ref_z[n:][lo:hi], rtol=0, atol=1e-10)
    for k, grad in grads.items():
        if world > 1:  # DeepSpeed/DDP average gradients over ranks
            dist.all_reduce(grad)
            grad /= world
        torch.testing.assert_close(grad, ref_grads[k], rtol=0, atol=1e-10, msg=k)
    for (k, buf), (_, ref_buf) in zip(ours.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(buf, ref_buf, rtol=0, atol=1e-10, msg=k)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ref = _model_reference(world)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        _check_bn(rank, world, global_stats=True)
        _check_bn(rank, world, global_stats=False)
        _check_model(rank, world, ref)
    finally:
        dist.destroy_process_group()


def test_masked_bn_one_process_equals_bn_on_valid_rows():
    _check_bn(0, 1, global_stats=False)
    _check_bn(0, 1, global_stats=True)
    _check_model(0, 1, _model_reference(1))


def test_masked_bn_two_processes_equals_one_process_bn_on_valid_rows():
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])
    mp.start_processes(_worker, args=(2, _free_port()), nprocs=2, join=True, start_method="forkserver")


def test_unmasked_padding_would_have_moved_the_valid_embeddings():
    """The bug this guards against, measured: plain BN over a padded batch changes the valid rows."""
    valid, v1, v2, patient, lo, hi = _model_case(0, 1)
    ref_z, ref_grads = _model_grads(_tiny_model(), v1, v2, patient, None, mask_bn=False)
    plain = _tiny_model()
    b = valid.numel()
    pat = torch.full((b,), -1, dtype=torch.int64)
    pat[valid] = patient
    z, grads = _model_grads(plain, _padded(v1, valid), _padded(v2, valid), pat, valid, mask_bn=False)
    moved = (z[:b][valid] - ref_z[:3]).norm() / ref_z[:3].norm()
    assert moved > 0.1  # padding zeros in the statistics move the embeddings by far more than rounding


def test_mask_of_the_wrong_length_is_refused_and_sync_bn_converts():
    bn = convert_to_masked_bn(nn.BatchNorm1d(4))
    set_batch_mask(bn, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch mask of shape"):
        bn(torch.randn(5, 4))
    converted = make_global_bn(nn.Sequential(nn.BatchNorm2d(2)), "cuda")  # conversion alone needs no GPU
    assert isinstance(converted[0], GlobalSyncBatchNorm) and isinstance(converted[0], nn.SyncBatchNorm)
