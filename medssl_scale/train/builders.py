"""Build the model and the optimizer a run config asks for."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..distributed.batchnorm import convert_to_masked_bn, make_global_bn
from ..models import ContrastiveModel, ProjectionHead, build_backbone
from ..optim import make_optimizer, scaled_lr
from ..config import ConfigError
from .storage import read_encoder


def build_model(cfg: RunConfig, device_type: str) -> ContrastiveModel:
    m = cfg.model
    backbone = build_backbone(m.depth, m.width, channels_last=m.channels_last, small_input=m.small_input,
                              zero_init_residual=m.zero_init_residual)
    if m.init_encoder:
        # An earlier stage's encoder (SimCLR on ImageNet -> MICLe): the backbone only, strictly.
        state, arch = read_encoder(m.init_encoder, "model.init_encoder")
        if arch is not None:
            theirs = {k: arch.get(k) for k in ("depth", "width", "small_input")}
            ours = {"depth": m.depth, "width": m.width, "small_input": m.small_input}
            if theirs != ours:
                raise ConfigError(f"model.init_encoder={m.init_encoder} is a ResNet {theirs} but this run builds "
                                  f"{ours}: set model.depth/width/small_input to match, or pick another encoder")
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"model.init_encoder={m.init_encoder} does not fit a ResNet-{m.depth} width "
                              f"{m.width} (small_input {m.small_input}): {str(e).splitlines()[0][:160]}") from None
    backbone.checkpoint_stages = cfg.train.activation_checkpointing
    head = ProjectionHead(backbone.feature_dim, m.head_hidden, m.out_dim, layers=m.head_layers)
    model = ContrastiveModel(backbone, head)
    # Every BN honours the batch mask (padding never enters its statistics): over all ranks with
    # model.global_bn (SimCLR), else per process as in plain DDP.
    if m.global_bn and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return make_global_bn(model, device_type)
    return convert_to_masked_bn(model)


def peak_lr(cfg: RunConfig) -> float:
    o = cfg.optim
    return o.base_lr if o.lr_scaling == "none" else scaled_lr(o.base_lr, cfg.train.global_batch, o.lr_scaling)


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    # SimCLR's TF LARS puts the learning rate inside the momentum buffer.
    return make_optimizer(o.name, model, lr=peak_lr(cfg), weight_decay=o.weight_decay, momentum=o.momentum,
                          betas=o.betas, lars_lr_in_velocity=True)
