"""Learning-rate rules as pure functions of the step, so a resumed run gets exactly the same lr."""

from __future__ import annotations

import math
import numbers


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _check_real(name: str, v, minimum: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {v!r}")
    return float(v)


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """Peak lr from the global batch size: "linear" = base_lr * B / 256 (Goyal et al.; SimCLR's 0.3 * B/256),
    "sqrt" = base_lr * sqrt(B) (SimCLR's 0.075 * sqrt(B), better for small batches and long runs)."""
    base_lr = _check_real("base_lr", base_lr)
    global_batch = _check_int("global_batch", global_batch, 1)
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    raise ValueError(f"lr scaling rule must be 'linear' or 'sqrt', got {rule!r}")


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> float:
    """The lr of optimizer step `step` (0-based):

        step < warmup_steps:          peak_lr * (step + 1) / warmup_steps    (step 0 is already non-zero,
                                      step warmup_steps-1 reaches peak_lr)
        warmup_steps <= step < total: final_lr + (peak_lr - final_lr) * (1 + cos(pi * t)) / 2,
                                      t = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:          final_lr

    So steps warmup_steps-1 and warmup_steps both run at peak_lr, and the last step (total_steps-1) is just
    above final_lr. warmup_steps=0 means no warmup.
    """
    step = _check_int("step", step, 0)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    total_steps = _check_int("total_steps", total_steps, 1)
    peak_lr = _check_real("peak_lr", peak_lr)
    final_lr = _check_real("final_lr", final_lr)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if final_lr > peak_lr:
        raise ValueError(f"final_lr ({final_lr}) must not exceed peak_lr ({peak_lr})")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return final_lr
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
