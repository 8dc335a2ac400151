"""The torchvision augmentation backend and its DataLoader, on real JPEG/PNG images made with PIL."""

from __future__ import annotations

import io
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from medssl_scale.augment.policy import (IMAGENET_MEAN, IMAGENET_STD, AugmentPolicy, ViewPolicy, draw_pair,
                                        neutral_params, preset)
from medssl_scale.augment.torchvision_backend import (CorruptImage, TorchvisionAugmenter, apply_view,
                                                      augment_view, decode_rgb, normalize)
from medssl_scale.augment.torchvision_loader import TorchvisionPairLoader
from medssl_scale.data.batch import RawPairBatch, padding_like

# The backend silences this at import; pytest resets warning filters for every test.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

# Only resize (and the flip coin): everything else switched off.
PLAIN = ViewPolicy(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                   blur_p=0.0)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def colour_image(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: red ramps left to right (so a mirror is visible), green top to bottom, blue noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(seed).integers(0, 256, (h, w))
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), noise], -1).astype(np.uint8)


def gray_image(h: int = 64, w: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def mid_image(seed: int = 2) -> np.ndarray:
    """Values 80..160 only: brightness/contrast factors in [0.5, 1.5] never clip."""
    return np.random.default_rng(seed).integers(80, 161, (64, 64, 3)).astype(np.uint8)


def view(img: np.ndarray, policy: ViewPolicy, size: int = 32, seed: int = 0) -> np.ndarray:
    """augment_view of a PNG-encoded image as (size, size, 3) float."""
    out = augment_view(decode_rgb(encode(img, "PNG")), policy, size, random.Random(seed))
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    return out.permute(1, 2, 0).numpy()


def pil_resize(img: np.ndarray, size: int) -> np.ndarray:
    """PIL's bilinear (antialiased when shrinking) resize, in [0, 1]."""
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.float32) / 255


def make_raw(first: list[bytes], seeds, second: list[bytes] | None = None, valid=None, epoch: int = 0,
             step: int = 0) -> RawPairBatch:
    n = len(first)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    return RawPairBatch(epoch=epoch, step=step, first=list(first), second=list(second or first),
                        patient=np.where(valid, 1000 + np.arange(n), -1).astype(np.int64), valid=valid,
                        keys=[(f"s#{epoch}-{step}-{i}.0.png", f"s#{epoch}-{step}-{i}.1.png") for i in range(n)],
                        seeds=np.asarray(seeds, np.uint64))


# --- decoding -----------------------------------------------------------------------------------------

def test_decode_rgb_png_is_exact_and_gray_expands_to_three_channels():
    rgb = colour_image(40, 56)
    assert torch.equal(decode_rgb(encode(rgb, "PNG")), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = gray_image(40, 56)
    out = decode_rgb(encode(gray, "PNG"))
    assert out.shape == (3, 40, 56) and out.dtype == torch.uint8
    assert all(torch.equal(out[c], torch.from_numpy(gray)) for c in range(3))
    jpeg = decode_rgb(encode(gray, "JPEG"))
    assert torch.equal(jpeg[0], jpeg[1]) and torch.equal(jpeg[0], jpeg[2])
    pil = np.asarray(Image.open(io.BytesIO(encode(gray, "JPEG"))), np.int16)
    assert np.abs(jpeg[0].numpy().astype(np.int16) - pil).max() <= 2


def test_decode_rgb_16_bit_png_keeps_the_high_byte():
    arr = np.random.default_rng(3).integers(0, 65536, (20, 30)).astype(np.uint16)
    out = decode_rgb(encode(arr, "PNG"))
    assert out.dtype == torch.uint8 and out.shape == (3, 20, 30)
    assert torch.equal(out[1], torch.from_numpy((arr >> 8).astype(np.uint8)))


@pytest.mark.parametrize("data", [b"", b"not an image at all", encode(colour_image(), "JPEG")[:300],
                                  encode(colour_image(), "PNG")[:200], b"\xff\xd8\xff" + b"x" * 64])
def test_decode_rgb_raises_corrupt_image(data):
    with pytest.raises(CorruptImage):
        decode_rgb(data)
    assert issubclass(CorruptImage, ValueError)


# --- one view -----------------------------------------------------------------------------------------

def test_flip_p_1_gives_the_mirrored_resize_and_flip_p_0_the_plain_one():
    img = colour_image()
    ref = pil_resize(img, 32)
    flipped = view(img, replace(PLAIN, flip_p=1.0), seed=5)
    plain = view(img, PLAIN, seed=5)
    # PIL rounds to 8 bits and uses fixed-point weights: within about one level.
    assert np.abs(flipped - ref[:, ::-1]).max() < 1.5 / 255
    assert np.abs(plain - ref).max() < 1.5 / 255
    assert np.abs(plain - ref[:, ::-1]).mean() > 0.1


def test_non_square_crop_fallback_and_output_size():
    # A 3:1 image with ratio (1, 1) and scale (1, 1) never fits: the centred square fallback is used.
    img = colour_image(32, 96)
    out = view(img, PLAIN, size=16)
    centre = pil_resize(np.ascontiguousarray(img[:, 32:64]), 16)
    assert np.abs(out - centre).max() < 1.5 / 255


def test_grayscale_p_1_gives_three_equal_luma_channels():
    img = colour_image()
    gray = view(img, replace(PLAIN, grayscale_p=1.0))
    plain = view(img, PLAIN)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    luma = plain @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601
    assert np.abs(gray[..., 0] - luma).max() < 2e-3
    assert np.abs(gray[..., 0] - plain[..., 0]).mean() > 0.05


def test_brightness_jitter_scales_every_pixel_by_one_factor_in_range():
    img, b = mid_image(), 0.5
    factors = []
    for seed in range(12):
        out = view(img, replace(PLAIN, jitter_p=1.0, brightness=b, contrast=0.0, saturation=0.0, hue=0.0),
                   seed=seed)
        ratio = out / view(img, PLAIN, seed=seed)
        assert ratio.std() < 1e-4
        factors.append(float(ratio.mean()))
    assert all(1 - b - 1e-4 <= f <= 1 + b + 1e-4 for f in factors)
    assert max(factors) - min(factors) > 0.3  # drawn, not fixed


def test_contrast_jitter_keeps_the_mean_and_scales_the_spread():
    img, c = mid_image(), 0.5
    for seed in range(6):
        out = view(img, replace(PLAIN, jitter_p=1.0, brightness=0.0, contrast=c, saturation=0.0, hue=0.0),
                   seed=seed)
        plain = view(img, PLAIN, seed=seed)
        # adjust_contrast blends towards the mean luma of the image, so its mean is a fixed point.
        luma = (plain @ np.array([0.299, 0.587, 0.114], np.float32)).mean()
        factor = (out - luma).std() / (plain - luma).std()
        assert 1 - c - 1e-3 <= factor <= 1 + c + 1e-3
        assert abs(out.mean() - plain.mean()) < 2e-3 + abs(plain.mean() - luma) * c


def test_blur_p_1_lowers_high_frequency_energy():
    img = np.stack([gray_image(seed=s) for s in range(3)], -1)

    def hf(x):  # mean squared difference between neighbouring pixels
        return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())

    blurred = view(img, replace(PLAIN, blur_p=1.0, blur_sigma=(1.5, 2.0)))
    plain = view(img, PLAIN)
    assert hf(blurred) < 0.3 * hf(plain)
    assert abs(blurred.mean() - plain.mean()) < 0.02


def test_rotation_stays_within_the_angle_range():
    white = np.full((64, 64, 3), 255, np.uint8)
    filled = []
    for seed in range(10):
        out = view(white, replace(PLAIN, rotate_deg=45.0), seed=seed)
        assert np.allclose(out[12:20, 12:20], 1.0, atol=1e-5)  # the centre never leaves the image
        filled.append(float((out[..., 0] < 0.5).mean()))
    # A square turned by 45 degrees leaves 1 - (2 sqrt 2 - 2) = 17 % of the frame uncovered, less for less;
    # the 32-pixel grid adds part of a row of edge pixels.
    assert max(filled) <= 0.20 and max(filled) > 0.02


def test_normalize_matches_the_formula():
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    want = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalize(x, mean, std), want, atol=1e-6)


# --- the augmenter ------------------------------------------------------------------------------------

def mixed_batch(seeds=(11, 12, 13, 14, 0)) -> RawPairBatch:
    """RGB JPEG, gray PNG, non-square RGB PNG, gray JPEG, one padding entry."""
    images = [encode(colour_image(), "JPEG"), encode(gray_image(), "PNG"), encode(colour_image(48, 64), "PNG"),
              encode(gray_image(50, 40), "JPEG"), b""]
    return make_raw(images, seeds, valid=[True, True, True, True, False])


@pytest.mark.parametrize("dtype, eps", [("float32", 1e-5), ("bfloat16", 0.03)])
def test_augmenter_shapes_dtype_range_and_passthrough(dtype, eps):
    policy = replace(preset("simclr", size=24), dtype=dtype)
    raw = mixed_batch()
    out = TorchvisionAugmenter(policy)(raw)
    torch_dtype = getattr(torch, dtype)
    assert set(out) == {"view1", "view2", "patient", "valid", "corrupt"}
    for key in ("view1", "view2"):
        v = out[key]
        assert v.shape == (5, 3, 24, 24) and v.dtype == torch_dtype
        for c in range(3):
            lo, hi = (0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert lo - eps <= v[:4, c].float().min() and v[:4, c].float().max() <= hi + eps
        assert torch.count_nonzero(v[4]) == 0  # padding
        assert v[:4].float().std() > 0.1
    assert out["patient"].dtype == torch.int64 and out["patient"].tolist() == raw.patient.tolist()
    assert out["valid"].dtype == torch.bool and out["valid"].tolist() == [True, True, True, True, False]
    assert out["corrupt"] == 0


def test_same_seeds_give_identical_outputs_and_different_seeds_different_crops():
    crop_only = ViewPolicy(crop_scale=(0.2, 0.5), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    aug = TorchvisionAugmenter(AugmentPolicy(size=24, views=(crop_only, crop_only)))
    a, b = aug(mixed_batch()), aug(mixed_batch())
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    c = aug(mixed_batch(seeds=(21, 22, 23, 24, 0)))
    for i in range(4):
        assert not torch.equal(a["view1"][i], c["view1"][i])
        assert not torch.equal(a["view1"][i], a["view2"][i])  # view 2 continues the generator


def test_the_augmenter_applies_the_parameters_drawn_from_each_pair_seed():
    # Crop and flip only: every view is PIL's resize of the window that draw_pair gives for the pair's seed
    # (the DALI backend applies the same draws: tests/test_augment_dali.py compares the two).
    img = colour_image(48, 64)
    crop_flip = ViewPolicy(crop_scale=(0.2, 0.6), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    policy = AugmentPolicy(size=24, views=(crop_flip, crop_flip))
    seeds = [3, 2**63 + 5, 77, 78]
    out = TorchvisionAugmenter(policy)(make_raw([encode(img, "PNG")] * 4, seeds))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    flips = []
    for i, seed in enumerate(seeds):
        for v, p in enumerate(draw_pair(seed, (48, 64), (48, 64), policy)):
            ref = pil_resize(np.ascontiguousarray(img[p.top:p.top + p.height, p.left:p.left + p.width]), 24)
            got = (out[f"view{v + 1}"][i] * std + mean).permute(1, 2, 0).numpy()
            assert np.abs(got - (ref[:, ::-1] if p.flip else ref)).max() < 1.5 / 255, (i, v, p)
            flips.append(p.flip)
    assert 0 < sum(flips) < len(flips)  # both branches were exercised


def test_neutral_parameters_give_the_plain_resize():
    img = colour_image(40, 40)
    out = apply_view(decode_rgb(encode(img, "PNG")), neutral_params(40, 40), PLAIN, 20)
    assert np.abs(out.permute(1, 2, 0).numpy() - pil_resize(img, 20)).max() < 1.5 / 255


def test_a_pair_depends_on_its_seed_only_not_its_position():
    aug = TorchvisionAugmenter(preset("dermatology", size=24))
    jpg, png = encode(colour_image(), "JPEG"), encode(gray_image(), "PNG")
    a = aug(make_raw([jpg, png], seeds=[2**64 - 1, 7]))
    b = aug(make_raw([png, png, jpg], seeds=[7, 8, 2**64 - 1]))
    assert torch.equal(a["view1"][0], b["view1"][2]) and torch.equal(a["view2"][1], b["view2"][0])


def test_corrupt_entry_is_skipped_as_invalid_zeros_and_counted():
    aug = TorchvisionAugmenter(preset("simclr", size=24))
    good = mixed_batch()
    bad = mixed_batch()
    bad.second[2] = bad.second[2][: len(bad.second[2]) // 2]  # truncated view-2 PNG
    g, out = aug(good), aug(bad)
    assert out["corrupt"] == 1
    assert out["valid"].tolist() == [True, True, False, True, False]
    assert torch.count_nonzero(out["view1"][2]) == 0 and torch.count_nonzero(out["view2"][2]) == 0
    for i in (0, 1, 3):
        assert torch.equal(out["view1"][i], g["view1"][i]) and torch.equal(out["view2"][i], g["view2"][i])


def test_corrupt_entry_with_on_corrupt_error_names_the_key():
    bad = mixed_batch()
    bad.first[1] = b"garbage bytes"
    with pytest.raises(CorruptImage, match="s#0-0-1.0.png"):
        TorchvisionAugmenter(preset("simclr", size=24), on_corrupt="error")(bad)
    with pytest.raises(ValueError):
        TorchvisionAugmenter(preset("simclr", size=24), on_corrupt="ignore")


# --- the loader ---------------------------------------------------------------------------------------

class ListSource:
    """A PairSource over a fixed list of real encoded images; step 3 holds one truncated JPEG."""

    batch_size = 3

    def __init__(self, steps: int = 5, out_of_order: bool = False, short: bool = False):
        self.steps, self.out_of_order, self.short = steps, out_of_order, short
        self.images = [encode(colour_image(seed=s), "JPEG") for s in range(3)] + [encode(gray_image(), "PNG")]

    def steps_per_epoch(self) -> int:
        return self.steps

    def batch(self, epoch: int, step: int) -> RawPairBatch:
        first = [self.images[(step + i) % 4] for i in range(self.batch_size)]
        second = [self.images[(step + i + 1) % 4] for i in range(self.batch_size)]
        if step == 3:
            first[1] = first[1][:100]
        raw = make_raw(first, [1000 * epoch + 10 * step + i for i in range(3)], second, epoch=epoch, step=step)
        if step == self.steps - 1:  # the epoch's end: the last entry is padding
            pad = padding_like(1)
            raw.first[2], raw.second[2], raw.keys[2] = pad["first"][0], pad["second"][0], pad["keys"][0]
            raw.valid[2], raw.patient[2] = False, -1
        return raw

    def batches(self, epoch, start_step=0, worker=0, num_workers=1):
        steps = range(start_step, self.steps - self.short)
        if self.out_of_order:
            steps = reversed(steps)
        for step in steps:
            if (step - start_step) % num_workers == worker:
                yield self.batch(epoch, step)


def run(loader: TorchvisionPairLoader) -> list:
    return list(loader)


@pytest.fixture(scope="module")
def full_epoch():
    loader = TorchvisionPairLoader(ListSource(), preset("simclr", size=16), num_workers=0)
    loader.set_epoch(1)
    batches = run(loader)
    assert loader.corrupt_skipped == 1 and loader.state_dict() == {"epoch": 1, "step": 5}
    return batches


def same(a, b) -> bool:
    return (a.epoch, a.step, a.keys) == (b.epoch, b.step, b.keys) and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("view1", "view2", "patient", "valid"))


def test_loader_in_process_yields_every_step_in_order(full_epoch):
    assert [b.step for b in full_epoch] == [0, 1, 2, 3, 4] and {b.epoch for b in full_epoch} == {1}
    assert full_epoch[3].valid.tolist() == [True, False, True]
    assert full_epoch[4].valid.tolist() == [True, True, False] and full_epoch[4].patient[2] == -1
    assert full_epoch[0].view1.shape == (3, 3, 16, 16) and full_epoch[0].view1.device.type == "cpu"


def test_loader_with_two_workers_matches_in_process(full_epoch):
    loader = TorchvisionPairLoader(ListSource(), preset("simclr", size=16), num_workers=2)
    loader.set_epoch(1)
    batches = run(loader)
    assert [b.step for b in batches] == [0, 1, 2, 3, 4]
    assert all(same(a, b) for a, b in zip(batches, full_epoch))
    assert loader.corrupt_skipped == 1


def test_loader_resumes_with_exactly_the_remaining_steps(full_epoch):
    first = TorchvisionPairLoader(ListSource(), preset("simclr", size=16), num_workers=2)
    first.set_epoch(1)
    it = iter(first)
    taken = [next(it), next(it)]
    state = first.state_dict()
    del it  # as if the run stopped here
    assert state == {"epoch": 1, "step": 2}
    resumed = TorchvisionPairLoader(ListSource(), preset("simclr", size=16), num_workers=2)
    resumed.load_state_dict(state)
    rest = run(resumed)
    assert [b.step for b in taken + rest] == [0, 1, 2, 3, 4]
    assert all(same(a, b) for a, b in zip(taken + rest, full_epoch))
    assert resumed.state_dict() == {"epoch": 1, "step": 5} and run(resumed) == []


def test_loader_rejects_out_of_order_or_short_sources():
    policy = preset("simclr", size=16)
    with pytest.raises(RuntimeError, match="expected epoch 0 step 0"):
        run(TorchvisionPairLoader(ListSource(out_of_order=True), policy, num_workers=0))
    with pytest.raises(RuntimeError, match="ended epoch 0 at step 4 of 5"):
        run(TorchvisionPairLoader(ListSource(short=True), policy, num_workers=0))


def test_loader_on_corrupt_error_raises_corrupt_image_from_a_worker():
    loader = TorchvisionPairLoader(ListSource(), preset("simclr", size=16), num_workers=2, on_corrupt="error")
    with pytest.raises(CorruptImage, match="s#0-3-1.0.png"):
        run(loader)
