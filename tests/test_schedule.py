"""Warmup + cosine lr and batch-size scaling rules, at the boundary steps, against hand-computed values."""

import math

import pytest

from medssl_scale.optim import lr_at, scaled_lr


def test_scaling_rules():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8, abs=1e-15)      # SimCLR: 0.3 x 4096/256
    assert scaled_lr(0.3, 256, "linear") == pytest.approx(0.3, abs=1e-15)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8, abs=1e-15)      # 0.075 x 64
    assert scaled_lr(0.075, 1024, "sqrt") == pytest.approx(2.4, abs=1e-15)      # 0.075 x 32
    assert scaled_lr(0.1, 2, "sqrt") == pytest.approx(0.1414213562373095, abs=1e-15)


# peak 1.0, warmup 10, total 110, final 0: cosine over 100 steps.
@pytest.mark.parametrize("step,expected", [
    (0, 0.1),                  # (0 + 1) / 10
    (4, 0.5),
    (9, 1.0),                  # warmup - 1: (9 + 1) / 10
    (10, 1.0),                 # warmup: cos(0)
    (35, 0.8535533905932737),  # t = 1/4: (1 + cos(pi/4)) / 2 = (1 + 0.70710678...) / 2
    (60, 0.5),                 # middle of the cosine: t = 1/2
    (109, 0.00024671981713420),  # total - 1: t = 99/100, (1 - cos(pi/100)) / 2
    (110, 0.0),                # total
    (500, 0.0),                # past the end stays at final_lr
])
def test_warmup_then_cosine(step, expected):
    assert lr_at(step, 1.0, 10, 110) == pytest.approx(expected, abs=1e-15)


def test_final_lr_and_no_warmup():
    # peak 2, final 0.5, no warmup, total 4: t = step/4; lr = 0.5 + 1.5 (1 + cos(pi t)) / 2
    assert lr_at(0, 2.0, 0, 4, final_lr=0.5) == pytest.approx(2.0, abs=1e-15)
    assert lr_at(2, 2.0, 0, 4, final_lr=0.5) == pytest.approx(1.25, abs=1e-15)
    assert lr_at(3, 2.0, 0, 4, final_lr=0.5) == pytest.approx(0.5 + 0.75 * (1 - math.sqrt(0.5)), abs=1e-15)
    assert lr_at(4, 2.0, 0, 4, final_lr=0.5) == 0.5
    # warmup over the whole run: no cosine phase at all.
    assert [lr_at(s, 1.0, 4, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 0.0]


@pytest.mark.parametrize("args,match", [
    (dict(step=-1), "step must be an integer >= 0"),
    (dict(step=1.5), "step must be an integer"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
    (dict(total_steps=0), "total_steps must be an integer >= 1"),
    (dict(warmup_steps=20, total_steps=10), r"warmup_steps \(20\) must not exceed total_steps \(10\)"),
    (dict(peak_lr=-0.1), "peak_lr must be a finite number >= 0"),
    (dict(peak_lr=float("nan")), "peak_lr must be a finite number"),
    (dict(final_lr=2.0), r"final_lr \(2.0\) must not exceed peak_lr \(1.0\)"),
])
def test_lr_at_bad_arguments(args, match):
    kwargs = dict(step=0, peak_lr=1.0, warmup_steps=5, total_steps=100) | args
    with pytest.raises(ValueError, match=match):
        lr_at(**kwargs)


def test_scaled_lr_bad_arguments():
    with pytest.raises(ValueError, match="rule must be 'linear' or 'sqrt', got 'square'"):
        scaled_lr(0.1, 256, "square")
    with pytest.raises(ValueError, match="global_batch must be an integer >= 1"):
        scaled_lr(0.1, 0, "linear")
    with pytest.raises(ValueError, match="base_lr must be a finite number >= 0"):
        scaled_lr(-0.1, 256, "sqrt")
