"""Collectives the losses need: an all-gather that carries gradient, and small no-grad helpers.

Every function here is the identity (or the trivial answer) when torch.distributed is not initialized
or the group has one process, so single-process code paths need no special casing. All ranks must call
the same functions in the same order with tensors of the same shape, or the job hangs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "gather_with_grad", "gather_nograd", "all_reduce_sum"]


def is_distributed(group=None) -> bool:
    """True when a process group is up and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    """Number of processes in `group` (the default group when None); 1 when not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank(group=None) -> int:
    """This process's rank within `group`; 0 when not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def _all_gather_cat(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    # The list form works on every backend (gloo has no all_gather_into_tensor on all versions).
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor. Backward: each rank's loss depends on every rank's
    slice, so the gradient of the sum of all ranks' losses w.r.t. this rank's slice is the sum over ranks
    of the incoming gradients, restricted to this rank's rows (a reduce-scatter; gloo lacks one, so an
    all-reduce followed by slicing)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        ctx.rows = x.shape[0]
        return _all_gather_cat(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[start:start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) on each rank -> (B * world, ...): every rank's tensor in rank order, differentiable.

    The backward sums the incoming gradients over ranks and returns this rank's rows, so that the
    gradient each rank sees is that of the sum of all ranks' losses. Identity with one process.
    """
    if not is_distributed(group):
        return x
    return _GatherWithGrad.apply(x, group)


def gather_nograd(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) -> (B * world, ...) without gradient, for labels, ids and masks (int or bool tensors)."""
    if not is_distributed(group):
        return x
    with torch.no_grad():
        if x.dtype == torch.bool:  # not every backend reduces/gathers bool; uint8 travels everywhere
            return _all_gather_cat(x.to(torch.uint8), group).bool()
        return _all_gather_cat(x.detach(), group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of `x` over ranks, as a new detached tensor (the input is left untouched)."""
    out = x.detach().clone()
    if is_distributed(group):
        if out.dtype == torch.bool:
            out = out.to(torch.int64)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
