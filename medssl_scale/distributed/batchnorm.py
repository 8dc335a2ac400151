"""Batch norm whose training statistics span all ranks, on any device (gloo on CPU included)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x. Rank r's loss depends on every rank's x, so dL/dx_r sums the incoming
    gradients of all ranks: the backward is again an all-reduce SUM (every rank must call backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g, None


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _GlobalBatchNormMixin:
    """Training-mode statistics over the union of all ranks' batches (ranks may hold different batch sizes).

    Two all-reduces per layer: [sum(x), count] gives the global mean, then sum((x - mean)^2) the global
    variance; two passes avoid the cancellation of E[x^2] - E[x]^2. Statistics are computed in at least
    float32. Running stats are updated from the global (identical) statistics, so they stay equal on every
    rank; running_var uses the unbiased variance, as nn.BatchNorm does. In eval mode, or with a single
    process, this is exactly nn.BatchNorm.
    """

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world(self.process_group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        local_n = x.numel() // c if c else 0
        sums = torch.cat([xs.sum(dims), xs.new_full((1,), float(local_n))])
        sums = _AllReduceSum.apply(sums, self.process_group)
        count = sums[-1].detach()
        if count.item() <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel over all ranks "
                             f"when training, got {int(count.item())}")
        mean = sums[:-1] / count
        centered = xs - mean.view(shape)
        var = _AllReduceSum.apply((centered * centered).sum(dims), self.process_group) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum=None means a cumulative average, as in nn.BatchNorm.
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        unbiased = var * (count / (count - 1))
        self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)


class GlobalBatchNorm1d(_GlobalBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d with cross-rank training statistics; input (B, C) or (B, C, L)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


class GlobalBatchNorm2d(_GlobalBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d with cross-rank training statistics; input (B, C, H, W)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


def convert_to_global_bn(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d in `module` by its Global counterpart, keeping weights, buffers,
    requires_grad and train/eval mode. Returns the converted module (a new one if `module` itself is a BN)."""
    out = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, _GlobalBatchNormMixin):
        cls = GlobalBatchNorm1d if isinstance(module, nn.BatchNorm1d) else GlobalBatchNorm2d
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  process_group=process_group)
        # Share the tensors themselves (as SyncBatchNorm's converter does): optimizer state stays valid.
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_to_global_bn(child, process_group))
    return out


def make_global_bn(module: nn.Module, device_type: str, process_group=None) -> nn.Module:
    """Synchronize BatchNorm statistics across ranks, as SimCLR does (its large-batch results rely on it):
    device_type "cuda" uses torch.nn.SyncBatchNorm (fused NCCL kernels), anything else (e.g. "cpu" with
    gloo) uses GlobalBatchNorm1d/2d, since SyncBatchNorm refuses CPU tensors.

    Without this conversion BN statistics are per process (local to each rank's batch), as in plain DDP.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return convert_to_global_bn(module, process_group)
