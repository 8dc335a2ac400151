"""The torchvision (v2 functional) augmentation backend on CPU: decode, augment and normalize pairs."""

from __future__ import annotations

import math
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from medssl_scale.augment.policy import AugmentPolicy, ViewPolicy
from medssl_scale.data.batch import CorruptImage, RawPairBatch

# torchvision 0.29 warns on every decode_image call (decoding moves to TorchCodec); once per image
# would flood worker logs. Only that message is silenced, and only as a DeprecationWarning.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode JPEG/PNG bytes to uint8 (3, H, W); grayscale images become 3 equal channels."""
    if not data:
        raise CorruptImage("empty image bytes")
    try:
        # bytearray: torch.frombuffer warns on (and must not write to) immutable bytes.
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        # The C++ message starts with a source path and line; the last clause says what went wrong.
        raise CorruptImage(f"undecodable image ({len(data)} bytes): {str(e).split(', ')[-1][:120]}") from None
    if img.dtype != torch.uint8:
        # 16-bit PNGs decode to uint16 even in RGB mode; shards hold 8-bit images, DALI decodes to 8 bits.
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _crop_params(height: int, width: int, view: ViewPolicy, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params drawn from `gen`: (top, left, h, w)."""
    area = height * width
    log_lo, log_hi = math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1])
    for _ in range(10):
        target_area = area * _uniform(gen, *view.crop_scale)
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (), generator=gen).item())
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio is within range.
    in_ratio = width / height
    if in_ratio < view.crop_ratio[0]:
        w, h = width, int(round(width / view.crop_ratio[0]))
    elif in_ratio > view.crop_ratio[1]:
        w, h = int(round(height * view.crop_ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_view(img: torch.Tensor, view: ViewPolicy, size: int, gen: torch.Generator) -> torch.Tensor:
    """One view of uint8 (3, H, W) `img`: float32 (3, size, size) in [0, 1], not normalized.

    Every random draw comes from `gen`, in the policy's order, so one generator state gives one result.
    """
    top, left, h, w = _crop_params(img.shape[-2], img.shape[-1], view, gen)
    # Crop the uint8 view first, then resize in float: the uint8 bilinear path of resize is CPU-dependent
    # (native on AVX2, float+round elsewhere) and quantizes to 8 bits.
    x = F.to_dtype(F.crop(img, top, left, h, w), torch.float32, scale=True)
    x = F.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if _uniform(gen, 0.0, 1.0) < view.flip_p:
        x = F.horizontal_flip(x)
    if view.rotate_deg > 0:
        angle = _uniform(gen, -view.rotate_deg, view.rotate_deg)
        x = F.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    if _uniform(gen, 0.0, 1.0) < view.jitter_p:
        # Fixed order (brightness, contrast, saturation, hue), as the DALI backend has no random order.
        if view.brightness > 0:
            x = F.adjust_brightness(x, _uniform(gen, max(0.0, 1 - view.brightness), 1 + view.brightness))
        if view.contrast > 0:
            x = F.adjust_contrast(x, _uniform(gen, max(0.0, 1 - view.contrast), 1 + view.contrast))
        if view.saturation > 0:
            x = F.adjust_saturation(x, _uniform(gen, max(0.0, 1 - view.saturation), 1 + view.saturation))
        if view.hue > 0:
            x = F.adjust_hue(x, _uniform(gen, -view.hue, view.hue))
    if _uniform(gen, 0.0, 1.0) < view.grayscale_p:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if _uniform(gen, 0.0, 1.0) < view.blur_p:
        k = view.blur_kernel(size)
        sigma = _uniform(gen, *view.blur_sigma)
        x = F.gaussian_blur(x, [k, k], [sigma, sigma])
    return x


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of float (..., 3, H, W)."""
    return F.normalize(x, mean=list(mean), std=list(std))


class TorchvisionAugmenter:
    """RawPairBatch -> two normalized views per pair, as a dict of CPU tensors."""

    def __init__(self, policy: AugmentPolicy, on_corrupt: str = "skip"):
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', not {on_corrupt!r}")
        self.policy = policy
        self.on_corrupt = on_corrupt
        self.dtype = _DTYPES[policy.dtype]

    @staticmethod
    def _decode(raw: RawPairBatch, i: int, which: int) -> torch.Tensor:
        try:
            return decode_rgb((raw.first, raw.second)[which][i])
        except CorruptImage as e:
            raise CorruptImage(f"{raw.keys[i][which]} (epoch {raw.epoch}, step {raw.step}): {e}") from None

    def __call__(self, raw: RawPairBatch) -> dict:
        """{"view1", "view2": (B, 3, S, S) policy dtype; "patient": int64 (B,); "valid": bool (B,);
        "corrupt": int}. Padding and skipped corrupt entries are all-zero images with valid False."""
        n, size = len(raw), self.policy.size
        views = torch.zeros(2, n, 3, size, size)
        valid = torch.as_tensor(raw.valid, dtype=torch.bool).clone()
        corrupt = 0
        for i in range(n):
            if not valid[i]:
                continue
            try:
                first = self._decode(raw, i, 0)
                # SimCLR pairs carry the same bytes twice: decode once.
                second = first if raw.second[i] == raw.first[i] else self._decode(raw, i, 1)
            except CorruptImage:
                if self.on_corrupt == "error":
                    raise
                valid[i] = False
                corrupt += 1
                continue
            # One generator per pair, view 1 then view 2: the result depends on the pair's seed only.
            gen = torch.Generator().manual_seed(int(raw.seeds[i]))
            views[0, i] = augment_view(first, self.policy.views[0], size, gen)
            views[1, i] = augment_view(second, self.policy.views[1], size, gen)
        views = normalize(views, self.policy.mean, self.policy.std)
        views[:, ~valid] = 0.0
        views = views.to(self.dtype)
        return {"view1": views[0], "view2": views[1],
                "patient": torch.as_tensor(raw.patient, dtype=torch.int64).clone(),
                "valid": valid, "corrupt": corrupt}
