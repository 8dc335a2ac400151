"""Optimizers and learning-rate schedules for large-batch contrastive pretraining."""

from medssl_scale.optim.factory import make_optimizer
from medssl_scale.optim.lars import LARS, lars_param_groups
from medssl_scale.optim.schedule import lr_at, scaled_lr

__all__ = ["LARS", "lars_param_groups", "lr_at", "make_optimizer", "scaled_lr"]
