"""The torchvision (v2 functional) augmentation backend on CPU: decode, augment and normalize pairs."""

from __future__ import annotations

import random
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from medssl_scale.augment.policy import AugmentPolicy, ViewParams, ViewPolicy, draw_pair, draw_view
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


def apply_view(img: torch.Tensor, p: ViewParams, view: ViewPolicy, size: int) -> torch.Tensor:
    """One view of uint8 (3, H, W) `img` with the drawn parameters `p`: float32 (3, size, size) in [0, 1],
    not normalized. `view` gives only the blur kernel size; every random choice is in `p`."""
    # Crop the uint8 view first, then resize in float: the uint8 bilinear path of resize is CPU-dependent
    # (native on AVX2, float+round elsewhere) and quantizes to 8 bits.
    x = F.to_dtype(F.crop(img, p.top, p.left, p.height, p.width), torch.float32, scale=True)
    x = F.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if p.flip:
        x = F.horizontal_flip(x)
    if p.angle != 0.0:
        x = F.rotate(x, p.angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    # Neutral factors are skipped: each op is the identity there. Fixed order, as DALI has no random order.
    if p.brightness != 1.0:
        x = F.adjust_brightness(x, p.brightness)
    if p.contrast != 1.0:
        x = F.adjust_contrast(x, p.contrast)
    if p.saturation != 1.0:
        x = F.adjust_saturation(x, p.saturation)
    if p.hue != 0.0:
        x = F.adjust_hue(x, p.hue)
    if p.grayscale:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur:
        k = view.blur_kernel(size)
        x = F.gaussian_blur(x, [k, k], [p.sigma, p.sigma])
    return x


def augment_view(img: torch.Tensor, view: ViewPolicy, size: int, rng: random.Random) -> torch.Tensor:
    """One view of uint8 (3, H, W) `img` with parameters drawn from `rng`: float32 (3, size, size) in [0, 1]."""
    return apply_view(img, draw_view(img.shape[-2], img.shape[-1], view, rng), view, size)


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
            # The pair's parameters depend on its seed and image sizes only (the DALI backend draws the same).
            p1, p2 = draw_pair(raw.seeds[i], first.shape[-2:], second.shape[-2:], self.policy)
            views[0, i] = apply_view(first, p1, self.policy.views[0], size)
            views[1, i] = apply_view(second, p2, self.policy.views[1], size)
        views = normalize(views, self.policy.mean, self.policy.std)
        views[:, ~valid] = 0.0
        views = views.to(self.dtype)
        return {"view1": views[0], "view2": views[1],
                "patient": torch.as_tensor(raw.patient, dtype=torch.int64).clone(),
                "valid": valid, "corrupt": corrupt}
