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


class _MaskedBatchNormMixin:
    """Training-mode statistics over the rows a mask keeps, over this rank's batch or all ranks' batches.

    `batch_mask` (bool (B,), set with `set_batch_mask` before a forward) names the rows that count: padding
    at the end of an epoch and skipped images are normalized with the statistics of the valid rows but
    never enter them, so a padded batch gives its valid rows exactly the outputs, gradients and running
    statistics of the valid rows alone. None means every row counts.

    With `global_stats` the statistics cover the union of all ranks' kept rows (ranks may hold different
    numbers): two all-reduces per layer, [sum(x), count] for the mean, then sum((x - mean)^2) for the
    variance; two passes avoid the cancellation of E[x^2] - E[x]^2. Statistics are computed in at least
    float32. Running stats are updated from the global (identical) statistics, so they stay equal on every
    rank; running_var uses the unbiased variance, as nn.BatchNorm does. In eval mode this is exactly
    nn.BatchNorm; unmasked local statistics (and, for SyncBatchNorm, unmasked global ones) run the native
    kernels.
    """

    process_group = None
    global_stats = True
    batch_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        distributed = self.global_stats and _world(self.process_group) > 1
        mask = self.batch_mask
        if mask is not None and mask.shape != (x.shape[0],):
            raise ValueError(f"{type(self).__name__}: batch mask of shape {tuple(mask.shape)} for a batch of "
                             f"{x.shape[0]} rows; call set_batch_mask before each forward")
        if mask is None and (not distributed or isinstance(self, nn.SyncBatchNorm)):
            return super().forward(x)
        return self._masked_forward(x, mask, distributed)

    def _masked_forward(self, x: torch.Tensor, mask: torch.Tensor | None, distributed: bool) -> torch.Tensor:
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        per_row = x[0].numel() // c if c and x.shape[0] else 0
        if mask is None:
            weight, rows = None, x.shape[0]
        else:
            weight = mask.to(device=x.device, dtype=xs.dtype).view([-1] + [1] * (x.dim() - 1))
            rows = int(mask.sum())
        reduce = (lambda t: _AllReduceSum.apply(t, self.process_group)) if distributed else (lambda t: t)
        sums = torch.cat([(xs if weight is None else xs * weight).sum(dims), xs.new_full((1,), float(rows * per_row))])
        sums = reduce(sums)
        count = sums[-1].detach()
        if count.item() <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel"
                             f"{' over all ranks' if distributed else ''} when training, got {int(count.item())}")
        mean = sums[:-1] / count
        centered = xs - mean.view(shape)
        squares = centered * centered if weight is None else centered * centered * weight
        var = reduce(squares.sum(dims)) / count
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


class MaskedBatchNorm1d(_MaskedBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics skip masked-out rows (this rank only); input (B, C) or (B, C, L)."""

    global_stats = False


class MaskedBatchNorm2d(_MaskedBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics skip masked-out rows (this rank only); input (B, C, H, W)."""

    global_stats = False


class GlobalBatchNorm1d(_MaskedBatchNormMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d with cross-rank training statistics; input (B, C) or (B, C, L)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


class GlobalBatchNorm2d(_MaskedBatchNormMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d with cross-rank training statistics; input (B, C, H, W)."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group


class GlobalSyncBatchNorm(_MaskedBatchNormMixin, nn.SyncBatchNorm):
    """nn.SyncBatchNorm (fused NCCL kernels) for full batches; masked batches take the all-reduce path."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, process_group=process_group, **kwargs)


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def _convert(module: nn.Module, pick, process_group) -> nn.Module:
    out = module
    if isinstance(module, _PLAIN) and not isinstance(module, _MaskedBatchNormMixin):
        cls = pick(module)
        kwargs = {} if cls in (MaskedBatchNorm1d, MaskedBatchNorm2d) else {"process_group": process_group}
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  **kwargs)
        # Share the tensors themselves (as SyncBatchNorm's converter does): optimizer state stays valid.
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert(child, pick, process_group))
    return out


def _dims(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.BatchNorm1d) else 2


def convert_to_global_bn(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d in `module` by its Global counterpart, keeping weights, buffers,
    requires_grad and train/eval mode. Returns the converted module (a new one if `module` itself is a BN)."""
    return _convert(module, lambda m: GlobalBatchNorm1d if _dims(m) == 1 else GlobalBatchNorm2d, process_group)


def convert_to_masked_bn(module: nn.Module) -> nn.Module:
    """Per-process BatchNorm (as plain DDP) whose statistics skip masked-out rows: every nn.BatchNorm1d/2d
    becomes MaskedBatchNorm1d/2d, tensors shared as in convert_to_global_bn."""
    return _convert(module, lambda m: MaskedBatchNorm1d if _dims(m) == 1 else MaskedBatchNorm2d, None)


def make_global_bn(module: nn.Module, device_type: str, process_group=None) -> nn.Module:
    """Synchronize BatchNorm statistics across ranks, as SimCLR does (its large-batch results rely on it):
    device_type "cuda" uses GlobalSyncBatchNorm (torch.nn.SyncBatchNorm's fused NCCL kernels on full
    batches), anything else (e.g. "cpu" with gloo) uses GlobalBatchNorm1d/2d, since SyncBatchNorm refuses
    CPU tensors. Both honour `set_batch_mask`.

    Without this conversion BN statistics are per process (local to each rank's batch), as in plain DDP.
    """
    if device_type == "cuda":
        return _convert(module, lambda m: GlobalSyncBatchNorm, process_group)
    return convert_to_global_bn(module, process_group)


def set_batch_mask(module: nn.Module, mask: torch.Tensor | None) -> None:
    """Tell every masked BatchNorm in `module` which rows of the next training forwards count: bool (B,),
    or None for all. Kept until changed, so activation-checkpoint recomputation in backward sees it too.

    Under global statistics every rank must pass a mask or every rank None in the same step (the masked
    and the SyncBatchNorm path use different collectives): agree first, e.g. with `sync.any_rank`.
    """
    for m in module.modules():
        if isinstance(m, _MaskedBatchNormMixin):
            m.batch_mask = mask
