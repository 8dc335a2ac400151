"""The host-side draws both backends apply (augment.policy.draw_view / draw_pair): order, values, ranges."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from medssl_scale.augment.policy import (AugmentPolicy, PolicyError, ViewParams, ViewPolicy, draw_pair, draw_view,
                                        neutral_params, policy_from_config, preset)

# Every draw of this view is a fixed affine function of one random() value, so the expected parameters can
# be written down from the raw stream: crop area 0.25 of 40 x 60 at ratio 1 is a 24 x 24 window.
FIXED = ViewPolicy(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip_p=0.5, rotate_deg=30.0, jitter_p=1.0,
                   brightness=0.4, contrast=0.0, saturation=0.2, hue=0.1, grayscale_p=0.5, blur_p=1.0,
                   blur_sigma=(0.5, 1.5))
# A full-area square crop never fits a 40 x 60 image: ten tries (two draws each), then the centred fallback.
FALLBACK = ViewPolicy(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0,
                      blur_p=0.0)


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_a_pair_follows_the_policy_order_on_one_stream(seed):
    u = random.Random(seed)
    u = [u.random() for _ in range(40)]
    # View 1: u0, u1 area and ratio (fixed), u2, u3 position, u4 flip, u5 angle, u6 jitter coin (p = 1),
    # u7 brightness, no contrast draw (amount 0), u8 saturation, u9 hue, u10 grayscale, u11 blur, u12 sigma.
    want1 = ViewParams(top=int(u[2] * 17), left=int(u[3] * 37), height=24, width=24, flip=u[4] < 0.5,
                       angle=-30 + 60 * u[5], jitter=True, brightness=0.6 + 0.8 * u[7], contrast=1.0,
                       saturation=0.8 + 0.4 * u[8], hue=-0.1 + 0.2 * u[9], grayscale=u[10] < 0.5, blur=True,
                       sigma=0.5 + u[12])
    # View 2 continues the same generator: u13..u32 are the ten failed tries, u33 the flip coin, then the
    # jitter, grayscale and blur coins (always drawn, never true here).
    want2 = ViewParams(0, 10, 40, 40, u[33] < 0.5, 0.0, False, 1.0, 1.0, 1.0, 0.0, False, False, 0.0)
    p1, p2 = draw_pair(seed, (40, 60), (40, 60), AugmentPolicy(views=(FIXED, FALLBACK)))
    for name, got, want in zip(ViewParams._fields, p1, want1):
        # lo + (hi - lo) u rounds differently from the written-out form in the last bit
        assert got == want if isinstance(want, (bool, int)) else math.isclose(got, want, abs_tol=1e-12), name
    assert p2 == want2

def test_the_jitter_coin_gates_the_factors_and_switching_it_off_leaves_them_neutral():
    off = replace(FIXED, jitter_p=0.0)
    for seed in range(50):
        p = draw_view(40, 60, off, random.Random(seed))
        assert (p.jitter, p.brightness, p.contrast, p.saturation, p.hue) == (False, 1.0, 1.0, 1.0, 0.0)
        assert p.blur and 0.5 <= p.sigma <= 1.5


def test_draws_have_the_policy_distributions():
    policy = preset("dermatology")
    view = policy.views[0]
    draws = [draw_view(200, 300, view, random.Random(seed)) for seed in range(4000)]
    rate = lambda key: np.mean([getattr(p, key) for p in draws])  # noqa: E731
    # Binomial standard errors at n = 4000 are below 0.008: these bounds are about 4 of them.
    assert abs(rate("flip") - 0.5) < 0.03 and abs(rate("jitter") - 0.8) < 0.03
    assert abs(rate("grayscale") - 0.2) < 0.03 and abs(rate("blur") - 0.5) < 0.03
    angles = np.array([p.angle for p in draws])
    assert angles.min() >= -180 and angles.max() <= 180 and abs(angles.mean()) < 7  # s.e. 1.6 degrees
    assert abs(angles.std() - 360 / math.sqrt(12)) < 5  # uniform on [-180, 180]
    for p in draws:
        assert 0 <= p.top and p.top + p.height <= 200 and 0 <= p.left and p.left + p.width <= 300
        # area in crop_scale up to rounding of the sides, aspect ratio in crop_ratio (or the fallback)
        assert 0.08 * 0.9 <= p.height * p.width / 60000 <= 1.0
        assert 3 / 4 * 0.9 <= p.width / p.height <= 4 / 3 * 1.1
        if p.jitter:
            assert 0.2 <= p.brightness <= 1.8 and 0.2 <= p.contrast <= 1.8 and 0.2 <= p.saturation <= 1.8
            assert -0.2 <= p.hue <= 0.2
        assert (0.1 <= p.sigma <= 2.0) if p.blur else p.sigma == 0.0
    # the crop position is uniform over the free range: the window centre's mean is the image centre
    centre_x = np.mean([(p.left + p.width / 2) / 300 for p in draws])
    assert abs(centre_x - 0.5) < 0.02


def test_different_seeds_draw_different_windows():
    view = preset("simclr").views[0]
    windows = {draw_view(224, 224, view, random.Random(seed))[:4] for seed in range(1000)}
    assert len(windows) > 990


def test_neutral_params_are_the_whole_image_unchanged():
    assert neutral_params(8, 6) == ViewParams(0, 0, 8, 6, False, 0.0, False, 1.0, 1.0, 1.0, 0.0, False, False, 0.0)


@pytest.mark.parametrize("key, value", [("rotate_deg", -10.0), ("rotate_deg", 270.0), ("blur_kernel_fraction", 0.0)])
def test_out_of_range_view_keys_are_errors_naming_the_key(key, value):
    with pytest.raises(PolicyError, match=f"augment.view.{key}"):
        policy_from_config({"view": {key: value}})
    assert policy_from_config({"view": {key: 90.0 if key == "rotate_deg" else 0.2}})  # in range: fine
