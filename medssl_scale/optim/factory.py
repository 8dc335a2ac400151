"""The optimizer of a name, as pretraining and fine-tuning both build it: one place for the parameter groups
(BatchNorm parameters and biases without weight decay, and for LARS without a trust ratio, as in SimCLR)."""

from __future__ import annotations

import torch

from medssl_scale.optim.lars import LARS, lars_param_groups


def make_optimizer(name: str, model: torch.nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9,
                   betas: tuple[float, float] = (0.9, 0.999), lars_lr_in_velocity: bool = False,
                   trainable_only: bool = False) -> torch.optim.Optimizer:
    """lars | sgd | adamw over `model`'s parameters. trainable_only drops groups left empty by frozen
    parameters (fine-tuning from a later layer); lars_lr_in_velocity: SimCLR's TF LARS (see lars.py)."""
    groups = lars_param_groups(model, weight_decay)
    if trainable_only:
        groups = [g for g in groups if g["params"]]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=0.001, lr_in_velocity=lars_lr_in_velocity)
    for g in groups:
        g.pop("lars_exclude", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}: use lars, sgd or adamw")
