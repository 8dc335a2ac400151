"""The augmentation policy, declared view by view in the run config, and the draws both backends apply.

Every random choice is made here, on the host, by `draw_pair` from the pair's seed (RawPairBatch.seeds),
in this order: random resized crop, horizontal flip, rotation, colour jitter (brightness, contrast,
saturation, hue, always in that order: DALI's colour ops have no random order, so neither has the
torchvision path), grayscale, Gaussian blur; then normalization. Both backends apply the same
parameters, so a pair's views depend on its seed and images only, not on the rank, worker, resume point
or (up to interpolation and the hue op, see docs/data-pipeline.md) the backend.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PolicyError(ValueError):
    """A bad augmentation config; the message names the key to fix."""


@dataclass(frozen=True)
class ViewPolicy:
    """How one of the two views of a pair is made."""

    crop_scale: tuple[float, float] = (0.08, 1.0)   # fraction of the image area kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop (log-uniform)
    flip_p: float = 0.5                              # horizontal flip
    rotate_deg: float = 0.0                          # angle uniform in [-rotate_deg, rotate_deg]
    jitter_p: float = 0.8                            # apply colour jitter with this probability
    brightness: float = 0.8                          # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.8                            # factor uniform in [1 - c, 1 + c] (around the mean)
    saturation: float = 0.8                          # factor uniform in [1 - s, 1 + s]
    hue: float = 0.2                                 # shift uniform in [-h, h] turns of the colour wheel
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)     # sigma in pixels of the output size
    # Kernel size as a fraction of the output side (SimCLR: 10 %), made odd.
    blur_kernel_fraction: float = 0.1

    def blur_kernel(self, size: int) -> int:
        k = max(3, int(round(size * self.blur_kernel_fraction)))
        return k if k % 2 else k + 1


@dataclass(frozen=True)
class AugmentPolicy:
    """Both views, the output size and normalization."""

    size: int = 224
    views: tuple[ViewPolicy, ViewPolicy] = (ViewPolicy(), ViewPolicy())
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dtype: str = "float32"  # or "bfloat16"

    def as_config(self) -> dict:
        return asdict(self)


def _jitter(strength: float) -> dict:
    """SimCLR's colour distortion of strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s."""
    return {"brightness": 0.8 * strength, "contrast": 0.8 * strength, "saturation": 0.8 * strength,
            "hue": 0.2 * strength}


def preset(name: str, size: int = 224, strength: float = 1.0) -> AugmentPolicy:
    """The named policies: 'simclr', 'dermatology' (SimCLR plus rotation), 'chest_xray'."""
    if name == "simclr":
        view = ViewPolicy(**_jitter(strength))
    elif name == "dermatology":
        # Skin lesions have no canonical orientation: full rotations are label-preserving.
        view = ViewPolicy(**_jitter(strength), rotate_deg=180.0)
    elif name == "chest_xray":
        # Grayscale radiographs: no hue or saturation to jitter, and blur would erase fine findings.
        view = ViewPolicy(brightness=0.4 * strength, contrast=0.4 * strength, saturation=0.0, hue=0.0,
                          grayscale_p=0.0, blur_p=0.0, rotate_deg=45.0)
    else:
        raise PolicyError(f"unknown augmentation preset {name!r}: use simclr, dermatology or chest_xray")
    return AugmentPolicy(size=size, views=(view, view))


def checked_view(cfg: dict, base: ViewPolicy, where: str) -> ViewPolicy:
    names = {f.name for f in fields(ViewPolicy)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    view = replace(base, **values)
    for key in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
        if not 0.0 <= getattr(view, key) <= 1.0:
            raise PolicyError(f"{where}.{key} must be a probability in [0, 1]")
    lo, hi = view.crop_scale
    if not 0 < lo <= hi <= 1:
        raise PolicyError(f"{where}.crop_scale must satisfy 0 < low <= high <= 1")
    if not 0 < view.crop_ratio[0] <= view.crop_ratio[1]:
        raise PolicyError(f"{where}.crop_ratio must satisfy 0 < low <= high")
    if min(view.brightness, view.contrast, view.saturation) < 0 or not 0 <= view.hue <= 0.5:
        raise PolicyError(f"{where}: jitter amounts must be >= 0 and hue in [0, 0.5]")
    if not 0 < view.blur_sigma[0] <= view.blur_sigma[1]:
        raise PolicyError(f"{where}.blur_sigma must satisfy 0 < low <= high")
    if not 0 <= view.rotate_deg <= 180:
        raise PolicyError(f"{where}.rotate_deg must be in [0, 180] (angles are drawn in [-r, r])")
    if not 0 < view.blur_kernel_fraction <= 1:
        raise PolicyError(f"{where}.blur_kernel_fraction must be in (0, 1]")
    return view


def policy_from_config(cfg: dict) -> AugmentPolicy:
    """Build a policy from a config mapping; misspelt keys are errors, never silently ignored.

        {"preset": "simclr", "strength": 1.0, "size": 224, "dtype": "float32",
         "view": {...},  "views": [{...}, {...}],  "mean": [...], "std": [...]}

    `preset` gives the starting point; `view` overrides both views, `views` each one.
    """
    known = {"preset", "strength", "size", "dtype", "view", "views", "mean", "std"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise PolicyError(f"augment: unknown key(s) {unknown}; known: {sorted(known)}")
    size = int(cfg.get("size", 224))
    if size < 8:
        raise PolicyError("augment.size must be at least 8 pixels")
    policy = preset(cfg.get("preset", "simclr"), size=size, strength=float(cfg.get("strength", 1.0)))
    views = list(policy.views)
    if "view" in cfg:
        views = [checked_view(cfg["view"], v, "augment.view") for v in views]
    if "views" in cfg:
        if len(cfg["views"]) != 2:
            raise PolicyError("augment.views must list exactly two views")
        views = [checked_view(c, v, f"augment.views[{i}]") for i, (c, v) in enumerate(zip(cfg["views"], views))]
    dtype = cfg.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise PolicyError("augment.dtype must be float32 or bfloat16")
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise PolicyError("augment.mean and augment.std must list 3 values, std positive")
    return AugmentPolicy(size=size, views=(views[0], views[1]), mean=mean, std=std, dtype=dtype)


class ViewParams(NamedTuple):
    """Every random choice for one view; neutral values (factor 1, angle 0, ...) where a step is off."""

    top: int            # crop window in input pixels: rows top .. top + height, columns left .. left + width
    left: int
    height: int
    width: int
    flip: bool          # mirror left-right, after the crop and before the rotation
    angle: float        # degrees, counter-clockwise (torchvision's and DALI's convention)
    jitter: bool        # the colour jitter coin; the four factors below are neutral where it is False
    brightness: float   # factor
    contrast: float     # factor, about the gray mean of the image
    saturation: float   # factor
    hue: float          # turns of the colour wheel
    grayscale: bool
    blur: bool
    sigma: float        # blur sigma in output pixels; 0.0 where blur is False


def neutral_params(height: int, width: int) -> ViewParams:
    """The whole image, unchanged: what placeholder (padding, corrupt) entries get."""
    return ViewParams(0, 0, height, width, False, 0.0, False, 1.0, 1.0, 1.0, 0.0, False, False, 0.0)


def _crop_window(height: int, width: int, view: ViewPolicy, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: area uniform in crop_scale, aspect ratio log-uniform in
    crop_ratio, 10 tries, then the largest centred crop within the ratio range. (top, left, h, w)."""
    area = height * width
    log_lo, log_hi = math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1])
    for _ in range(10):
        target_area = area * _uniform(rng, *view.crop_scale)
        aspect = math.exp(_uniform(rng, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # int(u * n) for u in [0, 1): uniform over 0 .. n - 1 (random.randrange's algorithm is not
            # guaranteed across Python versions; random() is).
            return int(rng.random() * (height - h + 1)), int(rng.random() * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < view.crop_ratio[0]:
        w, h = width, int(round(width / view.crop_ratio[0]))
    elif in_ratio > view.crop_ratio[1]:
        w, h = int(round(height * view.crop_ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def draw_view(height: int, width: int, view: ViewPolicy, rng: random.Random) -> ViewParams:
    """One view's parameters for an image of height x width pixels, drawn from `rng` in the policy's order.

    Coins are always drawn; a value only where its step is on (rotate_deg > 0; the jitter coin and the
    amount > 0; the blur coin).
    """
    top, left, h, w = _crop_window(height, width, view, rng)
    flip = rng.random() < view.flip_p
    angle = _uniform(rng, -view.rotate_deg, view.rotate_deg) if view.rotate_deg > 0 else 0.0
    jitter = rng.random() < view.jitter_p
    factors = [1.0, 1.0, 1.0]
    hue = 0.0
    if jitter:
        for k, amount in enumerate((view.brightness, view.contrast, view.saturation)):
            if amount > 0:
                factors[k] = _uniform(rng, max(0.0, 1.0 - amount), 1.0 + amount)
        if view.hue > 0:
            hue = _uniform(rng, -view.hue, view.hue)
    grayscale = rng.random() < view.grayscale_p
    blur = rng.random() < view.blur_p
    sigma = _uniform(rng, *view.blur_sigma) if blur else 0.0
    return ViewParams(top, left, h, w, flip, angle, jitter, *factors, hue, grayscale, blur, sigma)


def draw_pair(seed: int, first_hw: tuple[int, int], second_hw: tuple[int, int],
              policy: AugmentPolicy) -> tuple[ViewParams, ViewParams]:
    """Both views' parameters of one pair from its seed (RawPairBatch.seeds[i]) and its images' (height,
    width): one generator per pair, view 1 then view 2, so the result depends on these arguments only.

    random.Random seeded with an int and its random() are the stream Python guarantees to keep across
    versions; it is also ~5x cheaper to seed than numpy's generators (this runs per pair on DALI's feeding
    thread).
    """
    rng = random.Random(int(seed))
    return (draw_view(*first_hw, policy.views[0], rng), draw_view(*second_hw, policy.views[1], rng))
