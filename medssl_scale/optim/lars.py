"""LARS (You et al. 2017) as SimCLR uses it: momentum SGD with a per-layer trust ratio and weight decay."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class LARS(torch.optim.Optimizer):
    """For each parameter tensor w with gradient g (a layer-wise rule: see the ZeRO note below):

        if not excluded:  g <- g + weight_decay * w
        if not excluded and ||w|| > 0 and ||g|| > 0:  g <- (eta * ||w|| / ||g||) * g      (trust ratio)
        v <- momentum * v + g        (v starts at 0)
        w <- w - lr * v

    Excluded tensors (group option `lars_exclude=True`; `lars_param_groups` puts BatchNorm parameters and
    all biases there, as SimCLR does) get neither weight decay nor the trust ratio: plain momentum SGD.
    Norms are L2 over the whole tensor, in the parameter's own dtype (fp32 master weights under DeepSpeed).

    lr_in_velocity=True is the exact rule of SimCLR's TF `LARSOptimizer` (classic_momentum=True):
    v <- momentum * v + lr * g;  w <- w - v. The two agree while lr is constant and differ only in how
    past velocity is rescaled when the schedule changes lr.

    ZeRO flattens and partitions parameters, so per-tensor norms would be computed on slices of the flat
    buffer: use this optimizer with unflattened parameters (ZeRO stage 0, or DDP).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, lr_in_velocity: bool = False):
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"LARS eta (trust coefficient) must be > 0, got {eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False,
                        lr_in_velocity=lr_in_velocity)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd, eta = group["lr"], group["momentum"], group["weight_decay"], group["eta"]
            exclude = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not exclude:
                    if wd != 0:
                        g = g.add(p, alpha=wd)
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    # Tensor ops, not .item(): no host sync per parameter on GPU.
                    trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                v = state["momentum_buffer"]
                if group["lr_in_velocity"]:
                    v.mul_(mom).add_(g, alpha=lr)
                    p.sub_(v)
                else:
                    v.mul_(mom).add_(g)
                    p.sub_(v, alpha=lr)
        return loss


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups for LARS: [{"params": decayed, "weight_decay": weight_decay, "lars_exclude": False},
    {"params": excluded, "weight_decay": 0.0, "lars_exclude": True}]. Excluded: every parameter of a
    BatchNorm module (nn.BatchNorm*, SyncBatchNorm, GlobalBatchNorm*) and every parameter named `bias`.
    Frozen parameters (requires_grad=False) are left out; shared parameters appear once."""
    excluded_ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _BatchNorm) or name == "bias":
                excluded_ids.add(id(p))
    decay, excluded = [], []
    for p in model.parameters():  # deduplicated by nn.Module
        if p.requires_grad:
            (excluded if id(p) in excluded_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": excluded, "weight_decay": 0.0, "lars_exclude": True}]
