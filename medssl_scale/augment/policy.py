"""The augmentation policy, declared view by view in the run config, shared by both backends.

Every random choice a backend makes is drawn from the distributions named here, in this order:
random resized crop, horizontal flip, rotation, colour jitter (brightness, contrast, saturation, hue,
always in that order: DALI's colour ops have no random order, so neither has the torchvision path),
grayscale, Gaussian blur, then normalization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

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


def _checked_view(cfg: dict, base: ViewPolicy, where: str) -> ViewPolicy:
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
        views = [_checked_view(cfg["view"], v, "augment.view") for v in views]
    if "views" in cfg:
        if len(cfg["views"]) != 2:
            raise PolicyError("augment.views must list exactly two views")
        views = [_checked_view(c, v, f"augment.views[{i}]") for i, (c, v) in enumerate(zip(cfg["views"], views))]
    dtype = cfg.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise PolicyError("augment.dtype must be float32 or bfloat16")
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise PolicyError("augment.mean and augment.std must list 3 values, std positive")
    return AugmentPolicy(size=size, views=(views[0], views[1]), mean=mean, std=std, dtype=dtype)


