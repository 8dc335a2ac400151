"""Batch arithmetic, optimizer/ZeRO/precision checks and the generated DeepSpeed config.

Everything here runs before any process group or data loading starts, so a bad config costs seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, RunConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int     # pairs per optimizer step over all ranks
    micro_batch: int      # pairs per rank per forward/backward
    grad_accum: int
    world_size: int


def batch_plan(cfg: RunConfig, world_size: int) -> BatchPlan:
    """global batch = micro batch x accumulation x world size; the config's global batch is the truth."""
    t = cfg.train
    if t.global_batch < 1 or t.grad_accum < 1:
        raise ConfigError("train.global_batch and train.grad_accum must be positive")
    per_step = t.grad_accum * world_size
    if t.global_batch % per_step:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by grad_accum x world size "
                          f"= {t.grad_accum} x {world_size}; choose a multiple of {per_step}")
    return BatchPlan(t.global_batch, t.global_batch // per_step, t.grad_accum, world_size)


def check_combination(cfg: RunConfig) -> None:
    """Refuse what would train wrongly rather than run it.

    LARS needs each parameter tensor whole to compute its trust ratio; ZeRO stages 1-3 and DeepSpeed's
    fp16 optimizer hand the optimizer flat partitions instead, so LARS runs only at stage 0 with fp32
    weights (bf16 here is autocast over fp32 weights, which LARS handles).
    """
    t, o = cfg.train, cfg.optim
    if (t.steps > 0) == (t.epochs > 0):
        raise ConfigError("set exactly one of train.steps or train.epochs (> 0)")
    if o.name == "lars" and t.zero_stage > 0:
        raise ConfigError(f"optim.name=lars with train.zero_stage={t.zero_stage}: ZeRO flattens parameters into "
                          "partitions, so LARS trust ratios would be wrong; use zero_stage=0 or optim.name=sgd/adamw")
    if o.name == "lars" and t.precision == "fp16":
        raise ConfigError("optim.name=lars with train.precision=fp16: DeepSpeed's fp16 optimizer flattens "
                          "parameters; use precision bf16 (autocast) or fp32")
    if t.steps and o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}")
    if cfg.loss.temperature <= 0:
        raise ConfigError("loss.temperature must be positive")
    if cfg.data.workers < 0:
        raise ConfigError("data.workers must be >= 0")
    if t.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)")
    if t.checkpoint_every < 1 or t.log_every < 1:
        raise ConfigError("train.checkpoint_every and train.log_every must be at least 1")


def deepspeed_config(cfg: RunConfig, plan: BatchPlan) -> dict:
    """The DeepSpeed config, derived from ours (never written by hand, so the two cannot disagree)."""
    t = cfg.train
    ds = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 10**9,          # we report progress ourselves
        "wall_clock_breakdown": False,
    }
    if t.zero_stage > 0:
        # Our optimizers are plain torch ones: DeepSpeed must be told they are safe under ZeRO.
        ds["zero_allow_untested_optimizer"] = True
    if t.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    # Always explicit: DeepSpeed otherwise clips at a norm of 1.0, silently changing the optimizer.
    ds["gradient_clipping"] = t.grad_clip
    if t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds
