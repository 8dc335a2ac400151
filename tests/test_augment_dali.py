"""DaliPairLoader in CPU-only mode (device_id=None): policy, padding/corrupt handling, order and resume,
draws from the pair seeds (ranks, resume, replay) and agreement with the torchvision backend."""

from __future__ import annotations

import dataclasses
import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from medssl_scale.augment.dali_backend import (  # noqa: E402
    PLACEHOLDER_JPEG, CorruptImage, DaliPairLoader, check_encoded, image_size, probe_decode)
from medssl_scale.augment.policy import AugmentPolicy, ViewPolicy, draw_pair, preset  # noqa: E402
from medssl_scale.data.batch import RawPairBatch  # noqa: E402

# The torchvision backend (compared against here) silences this at import; pytest resets warning filters.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

# No randomness but the crop's position (full-size square crop of a square image: none) and the flip.
PLAIN = ViewPolicy(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                   blur_p=0.0)
MEAN = torch.tensor(AugmentPolicy().mean).view(3, 1, 1)
STD = torch.tensor(AugmentPolicy().std).view(3, 1, 1)


class ListSource:
    """A PairSource over a fixed list of steps (epoch stamped on the way out, and mixed into the pair seeds
    as the reader does: a new epoch, new draws)."""

    def __init__(self, steps: list[RawPairBatch]):
        self.steps = steps
        self.batch_size = len(steps[0])
        self.calls: list[tuple[int, int]] = []

    def steps_per_epoch(self) -> int:
        return len(self.steps)

    def batches(self, epoch, start_step=0, worker=0, num_workers=1):
        self.calls.append((epoch, start_step))
        for step in range(start_step + worker, len(self.steps), num_workers):
            raw = self.steps[step]
            yield dataclasses.replace(raw, epoch=epoch, seeds=raw.seeds + np.uint64(epoch * 1_000_003))


def smooth_image(n: int, seed: int, lo: int = 0, hi: int = 255) -> np.ndarray:
    """A smooth, colourful, asymmetric uint8 (n, n, 3) image with values in [lo, hi]."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n] / n
    a = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (x * r.uniform(0.5, 2) + y * r.uniform(0, 1))),
                  0.15 + 0.7 * x * y, 0.8 - 0.6 * y], -1)
    return (lo + (hi - lo) * np.clip(a, 0, 1)).astype(np.uint8)


def encode(a: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def bad_huffman(jpeg: bytes) -> bytes:
    """`jpeg` with a bogus Huffman table index: the header (and size) reads fine, decoders fail."""
    dht = jpeg.find(b"\xff\xc4")
    return jpeg[:dht + 4] + b"\x2f" + jpeg[dht + 5:]


def raw_step(step: int, images: list[bytes], valid=None, second=None, seeds=None) -> RawPairBatch:
    n = len(images)
    valid = np.array([bool(b) for b in images]) if valid is None else np.asarray(valid, bool)
    keys = [(f"shard-000000.tar#s{step}_{i}.img.jpg", f"shard-000000.tar#s{step}_{i}.img.jpg") if valid[i]
            else ("", "") for i in range(n)]
    seeds = 1000 * step + np.arange(n) if seeds is None else seeds  # distinct per entry, as the reader's
    return RawPairBatch(epoch=0, step=step, first=list(images), second=list(second or images),
                        patient=np.where(valid, np.arange(n) + 100 * step, -1).astype(np.int64), valid=valid,
                        keys=keys, seeds=np.asarray(seeds, np.uint64))


def run(steps, view: ViewPolicy = PLAIN, size: int = 32, dtype: str = "float32", **kw):
    loader = DaliPairLoader(ListSource(steps), AugmentPolicy(size=size, views=(view, view), dtype=dtype), **kw)
    loader.set_epoch(0)
    return loader, list(loader)


def unnormalize(v: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalized -> pixel values in [0, 1]."""
    return v.float() * STD + MEAN


def resized(a: np.ndarray, size: int) -> torch.Tensor:
    """PIL's bilinear (antialiased) resize: float (3, size, size) in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
                            .astype(np.float32) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def images():
    return [smooth_image(64, i) for i in range(6)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_dtypes_and_ranges(images, dtype):
    jpegs = [encode(a, "JPEG") for a in images]
    steps = [raw_step(0, jpegs[:4]), raw_step(1, jpegs[2:6])]
    loader, out = run(steps, ViewPolicy(rotate_deg=30.0), size=40, dtype=dtype)  # SimCLR view plus rotation
    lo = float(((0 - MEAN) / STD).min()) - 0.02
    hi = float(((1 - MEAN) / STD).max()) + 0.02
    for step, batch in enumerate(out):
        assert batch.epoch == 0 and batch.step == step
        for v in (batch.view1, batch.view2):
            assert v.shape == (4, 3, 40, 40) and v.device.type == "cpu"
            assert v.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
            assert torch.isfinite(v.float()).all()
            assert lo <= float(v.float().min()) and float(v.float().max()) <= hi
        assert batch.patient.dtype == torch.int64 and batch.patient.tolist() == steps[step].patient.tolist()
        assert batch.valid.dtype == torch.bool and batch.valid.all()
        assert batch.keys == steps[step].keys
        assert not torch.equal(batch.view1, batch.view2)  # two independent draws from the same image
    assert loader.state_dict() == {"epoch": 0, "step": 2}


def test_full_crop_with_flip_is_the_mirrored_resized_image(images):
    steps = [raw_step(0, [encode(a) for a in images[:4]])]
    _, (flipped,) = run(steps, dataclasses.replace(PLAIN, flip_p=1.0))
    _, (plain,) = run(steps, PLAIN)
    for i, a in enumerate(images[:4]):
        ref = resized(a, 32)
        for v in (flipped.view1[i], flipped.view2[i]):
            diff = (unnormalize(v) - ref.flip(-1)).abs()
            assert diff.mean() < 0.004 and diff.max() < 0.02, (i, float(diff.mean()), float(diff.max()))
            assert (unnormalize(v) - ref).abs().mean() > 0.05  # the images are not mirror-symmetric
        diff = (unnormalize(plain.view1[i]) - ref).abs()
        assert diff.mean() < 0.004 and diff.max() < 0.02


def test_grayscale_makes_equal_channels(images):
    steps = [raw_step(0, [encode(a) for a in images[:4]])]
    _, (batch,) = run(steps, dataclasses.replace(PLAIN, grayscale_p=1.0))
    px = unnormalize(batch.view1)
    # within one 8-bit level: DALI's hsv is a 3x3 matrix with rounded coefficients and a uint8 output
    spread = float((px.max(1).values - px.min(1).values).max())
    assert spread <= 1 / 255 + 1e-6, spread
    # ITU-R 601 luma, as torchvision's rgb_to_grayscale
    luma = sum(w * resized(images[0], 32)[c] for c, w in enumerate((0.299, 0.587, 0.114)))
    assert float((px[0, 1] - luma).abs().mean()) < 0.005


def test_brightness_jitter_scales_the_mean_within_bounds():
    # Values in 40..160: a factor up to 1.5 never clips, so the mean scales exactly by the factor.
    arrs = [smooth_image(48, i, 40, 160) for i in range(8)]
    steps = [raw_step(0, [encode(a) for a in arrs])]
    view = dataclasses.replace(PLAIN, jitter_p=1.0, brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0)
    _, (batch,) = run(steps, view)
    ratios = [float(unnormalize(batch.view1[i]).mean() / resized(a, 32).mean()) for i, a in enumerate(arrs)]
    assert all(0.5 - 0.01 <= r <= 1.5 + 0.01 for r in ratios), ratios
    assert max(ratios) - min(ratios) > 0.1, ratios  # a factor drawn per sample, not one for all


def test_contrast_keeps_the_gray_mean_and_saturation_keeps_luma():
    arrs = [smooth_image(48, i, 80, 170) for i in range(6)]
    steps = [raw_step(0, [encode(a) for a in arrs])]
    contrast = dataclasses.replace(PLAIN, jitter_p=1.0, brightness=0.0, contrast=0.4, saturation=0.0, hue=0.0)
    saturation = dataclasses.replace(contrast, contrast=0.0, saturation=0.8)
    _, (plain,) = run(steps, PLAIN)
    _, (c,) = run(steps, contrast)
    _, (s,) = run(steps, saturation)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    luma = lambda v: (unnormalize(v) * w).sum(1)  # noqa: E731
    assert (luma(c.view1).mean((1, 2)) - luma(plain.view1).mean((1, 2))).abs().max() < 0.004
    assert (unnormalize(c.view1).std((1, 2, 3)) / unnormalize(plain.view1).std((1, 2, 3)) - 1).abs().max() > 0.02
    assert (luma(s.view1) - luma(plain.view1)).abs().max() < 0.01
    assert (unnormalize(s.view1) - unnormalize(plain.view1)).abs().max() > 0.02


def test_blur_lowers_high_frequency_energy():
    rng = np.random.default_rng(5)
    noisy = [np.kron(rng.integers(0, 256, (16, 16, 3)), np.ones((2, 2, 1))).astype(np.uint8) for _ in range(4)]
    steps = [raw_step(0, [encode(a) for a in noisy])]
    _, (sharp,) = run(steps, PLAIN)
    _, (blurred,) = run(steps, dataclasses.replace(PLAIN, blur_p=1.0, blur_sigma=(1.0, 2.0)))

    def energy(v):
        dx = (v[..., 1:] - v[..., :-1]).pow(2).mean((1, 2, 3))
        return dx + (v[..., 1:, :] - v[..., :-1, :]).pow(2).mean((1, 2, 3))

    assert (energy(blurred.view1) < 0.5 * energy(sharp.view1)).all()
    assert torch.allclose(blurred.view1.mean((2, 3)), sharp.view1.mean((2, 3)), atol=0.1)


def test_padding_and_corrupt_entries_are_invalid_and_zero(images):
    good = [encode(a, "JPEG") for a in images]
    truncated = good[0][: len(good[0]) // 2]
    # Passes the cheap check (SOI ... EOI); its zero-sized frame is found by the header read for the crop.
    sof = good[1].find(b"\xff\xc0")
    zero_size = good[1][: sof + 5] + b"\x00\x00\x00\x00" + good[1][sof + 9:]
    assert check_encoded(zero_size) is None and image_size(zero_size) is None
    # Passes the cheap check and the header read: only the decoder finds out.
    bogus = bad_huffman(good[2])
    assert check_encoded(bogus) is None and image_size(bogus) == (64, 64) and probe_decode(bogus) is not None
    steps = [raw_step(0, [good[0], b"", truncated, good[1], b"not an image", zero_size]),
             raw_step(1, [good[3], bogus, good[4], b"", good[5], good[0]]),
             raw_step(2, good[:6])]
    loader, out = run(steps, ViewPolicy())
    assert [b.valid.tolist() for b in out] == [[True, False, False, True, False, False],
                                              [True, False, True, False, True, True], [True] * 6]
    for b in out:
        for v in (b.view1, b.view2):
            assert (v[~b.valid] == 0).all() and (v[b.valid].abs().sum((1, 2, 3)) > 0).all()
    assert loader.corrupt_skipped == 4  # truncated, garbage, zero-size, bogus table; padding is not corrupt
    assert loader.pipeline_builds == 2  # the bogus table failed DALI once; the loader rebuilt and refed
    assert loader.state_dict() == {"epoch": 0, "step": 3}


def test_replayed_steps_after_a_decode_failure_keep_their_draws(images):
    # A decode failure in step 1 makes the loader rebuild and feed the steps in flight again; every other
    # pair must come out exactly as in a run where the bad image was never there (a padding entry).
    good = [encode(a, "JPEG") for a in images]
    clean = [raw_step(s, [good[(s + i) % 6] for i in range(4)]) for s in range(4)]
    broken = [dataclasses.replace(r, first=list(r.first), second=list(r.second)) for r in clean]
    broken[1].first[2] = broken[1].second[2] = bad_huffman(clean[1].first[2])
    padded = [dataclasses.replace(r, first=list(r.first), second=list(r.second), valid=r.valid.copy())
              for r in clean]
    padded[1].first[2] = padded[1].second[2] = b""
    padded[1].valid[2] = False
    policy = preset("dermatology", size=24)
    runs = {}
    for name, steps in (("broken", broken), ("padded", padded)):
        loader = DaliPairLoader(ListSource(steps), policy, prefetch_queue_depth=2)
        loader.set_epoch(0)
        runs[name] = (loader, list(loader))
    (bl, b_out), (pl, p_out) = runs["broken"], runs["padded"]
    assert bl.pipeline_builds == 2 and pl.pipeline_builds == 1 and bl.corrupt_skipped == 1
    for x, y in zip(b_out, p_out):
        assert torch.equal(x.valid, y.valid) and torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2)


def test_an_image_only_dali_rejects_is_found_by_probing_with_dali():
    png = encode(smooth_image(16, 0))
    no_iend = png[:-12]  # every pixel is there, so PIL loads it; DALI's PNG decoder wants the IEND chunk
    assert probe_decode(no_iend) is None
    loader, (batch,) = run([raw_step(0, [png, no_iend, png])], PLAIN)
    assert batch.valid.tolist() == [True, False, True]
    assert loader.corrupt_skipped == 1 and loader.pipeline_builds == 2


def test_a_corrupt_second_image_drops_the_pair(images):
    good = [encode(a, "JPEG") for a in images[:3]]
    step = raw_step(0, good, second=[good[0], good[1][:100], good[2]])
    loader, (batch,) = run([step], ViewPolicy())
    assert batch.valid.tolist() == [True, False, True] and loader.corrupt_skipped == 1


@pytest.mark.parametrize("bad", ["truncated", "decoder"])
def test_on_corrupt_error_raises_naming_the_key(images, bad):
    good = [encode(a, "JPEG") for a in images[:4]]
    broken = good[1][:200] if bad == "truncated" else bad_huffman(good[1])
    steps = [raw_step(0, good), raw_step(1, [good[0], broken, good[2], good[3]]), raw_step(2, good)]
    loader = DaliPairLoader(ListSource(steps), AugmentPolicy(size=32), on_corrupt="error")
    loader.set_epoch(0)
    it = iter(loader)
    assert next(it).step == 0  # the step before the bad one still arrives, despite prefetching
    with pytest.raises(CorruptImage, match=r"shard-000000\.tar#s1_1\.img\.jpg \(epoch 0, step 1\)"):
        next(it)
    assert loader.state_dict() == {"epoch": 0, "step": 1}


def test_steps_in_order_and_resume_yields_exactly_the_rest(images):
    jpegs = [encode(a, "JPEG") for a in images]
    steps = [raw_step(s, [jpegs[(s + i) % 6] for i in range(3)]) for s in range(5)]
    policy = preset("simclr", size=24)
    first = DaliPairLoader(ListSource(steps), policy, seed=3)
    first.set_epoch(2)
    seen = []
    for batch in first:
        seen.append(batch.step)
        if len(seen) == 2:
            break
    state = first.state_dict()
    assert seen == [0, 1] and state == {"epoch": 2, "step": 2}

    source = ListSource(steps)
    resumed = DaliPairLoader(source, policy, seed=3)
    resumed.load_state_dict(state)
    assert len(resumed) == 3
    rest = list(resumed)
    assert [(b.epoch, b.step) for b in rest] == [(2, 2), (2, 3), (2, 4)]
    assert [b.keys for b in rest] == [s.keys for s in steps[2:]]
    assert source.calls == [(2, 2)] and resumed.state_dict() == {"epoch": 2, "step": 5}
    assert list(resumed) == []  # the epoch is done until set_epoch


def test_epochs_differ_and_an_epoch_repeats(images):
    steps = [raw_step(s, [encode(a, "JPEG") for a in images[:4]]) for s in range(2)]
    policy = preset("dermatology", size=24)

    def views(epoch, threads=2):
        loader = DaliPairLoader(ListSource(steps), policy, num_threads=threads)
        loader.set_epoch(epoch)
        return torch.cat([torch.cat([b.view1, b.view2]) for b in loader])

    e0 = views(0)
    assert torch.equal(e0, views(0, threads=1))  # draws depend on the pair seeds, not on threading
    assert not torch.equal(e0, views(1))  # the source's seeds change with the epoch


def test_a_resumed_loader_yields_exactly_the_uninterrupted_tensors(images):
    # Every op of the policy on (crop, flip, rotation, all four jitter factors, grayscale, blur).
    jpegs = [encode(a, "JPEG") for a in images]
    steps = [raw_step(s, [jpegs[(s + i) % 6] for i in range(4)]) for s in range(5)]
    policy = preset("dermatology", size=24)
    whole = DaliPairLoader(ListSource(steps), policy)
    whole.set_epoch(3)
    want = list(whole)
    for k in (1, 3):
        resumed = DaliPairLoader(ListSource(steps), policy, num_threads=1)
        resumed.load_state_dict({"epoch": 3, "step": k})
        got = list(resumed)
        assert [b.step for b in got] == list(range(k, 5))
        for a, b in zip(got, want[k:]):
            assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2), (k, a.step)


def test_a_source_error_is_not_taken_for_a_decode_failure(images):
    class Failing(ListSource):
        def batches(self, epoch, start_step=0, worker=0, num_workers=1):
            yield from list(super().batches(epoch, start_step))[:2]
            raise OSError("shard unreadable")

    good = [encode(a, "JPEG") for a in images[:2]]
    loader = DaliPairLoader(Failing([raw_step(s, good) for s in range(4)]), AugmentPolicy(size=16))
    loader.set_epoch(0)
    with pytest.raises(OSError, match="shard unreadable"):
        list(loader)


def test_placeholder_and_cheap_check():
    assert check_encoded(PLACEHOLDER_JPEG) is None
    assert check_encoded(b"") == "empty image bytes"
    png = encode(smooth_image(16, 0))
    assert check_encoded(png) is None and check_encoded(png[: len(png) // 2]) is not None
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    assert "not decodable by DALI" in check_encoded(gif.getvalue())


@pytest.mark.skipif(importlib.util.find_spec("medssl_scale.augment.torchvision_backend") is None,
                    reason="torchvision backend not present")
@pytest.mark.parametrize("view", [dataclasses.replace(PLAIN, flip_p=1.0),
                                  dataclasses.replace(PLAIN, grayscale_p=1.0)], ids=["flip", "grayscale"])
def test_agrees_with_the_torchvision_backend(images, view):
    from medssl_scale.augment.torchvision_backend import TorchvisionAugmenter

    step = raw_step(0, [encode(a) for a in images[:4]] + [b""])
    policy = AugmentPolicy(size=32, views=(view, view))
    _, (dali,) = run([step], view)
    tv = TorchvisionAugmenter(policy)(step)
    assert torch.equal(tv["valid"], dali.valid) and torch.equal(tv["patient"], dali.patient)
    for a, b in ((tv["view1"], dali.view1), (tv["view2"], dali.view2)):
        diff = (a - b).abs()
        # bilinear resize implementations differ by a level or two at a few pixels (0.02 ~ 1/255 / std)
        assert diff.mean() < 0.005 and diff.max() < 0.1, (float(diff.mean()), float(diff.max()))


@pytest.mark.shared_data
def test_real_dermoscopy_and_grayscale_xrays():
    from shardtools import SHARED_DATA

    ham = sorted((SHARED_DATA / "ham10000_subset" / "images").glob("*.jpg"))[:8]
    cxr = sorted((SHARED_DATA / "covid_cxr" / "images").glob("*.jpg"))[:8]
    if len(ham) < 8 or len(cxr) < 8:
        pytest.skip("../shared/data is absent")
    steps = [raw_step(0, [p.read_bytes() for p in ham]), raw_step(1, [p.read_bytes() for p in cxr])]
    loader, out = run(steps, ViewPolicy(), size=64)
    assert [b.valid.all().item() for b in out] == [True, True] and loader.corrupt_skipped == 0
    # Grayscale JPEGs decode to three equal channels; only hue/saturation jitter could tell them apart.
    _, (xray,) = run([dataclasses.replace(steps[1], step=0)], PLAIN, size=64)
    px = unnormalize(xray.view1)
    assert float((px.max(1).values - px.min(1).values).max()) < 1 / 255


def test_micle_pairs_decode_each_image(images):
    # Two different images per pair (MICLe), mixed with a same-image pair in one batch.
    a = [encode(x) for x in images[:3]]
    b = [encode(x) for x in images[3:5]] + [a[2]]
    _, (batch,) = run([raw_step(0, a, second=b)], PLAIN)
    for i, arr in enumerate(images[3:5] + [images[2]]):
        diff = (unnormalize(batch.view2[i]) - resized(arr, 32)).abs()
        assert diff.mean() < 0.004, (i, float(diff.mean()))
    for i, arr in enumerate(images[:3]):
        assert (unnormalize(batch.view1[i]) - resized(arr, 32)).abs().mean() < 0.004


def test_decoding_every_image_gives_the_same_batches(images):
    a = [encode(x, "JPEG") for x in images[:4]]
    steps = [raw_step(0, a, second=[a[0], encode(images[5], "JPEG"), a[2], b""]), raw_step(1, a)]
    steps[0].valid[3] = True  # an unreadable second image: the pair is dropped either way
    # The draws are made on the host, so the two graphs (one decoder or two) give the same tensors.
    view = preset("dermatology").views[0]
    once, out_once = run(steps, view)
    twice, out_twice = run(steps, view, decode_once=False)
    for x, y in zip(out_once, out_twice):
        assert torch.equal(x.valid, y.valid) and torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2)
    assert once.corrupt_skipped == twice.corrupt_skipped == 1


def test_the_gpu_contrast_formula_matches_the_cpu_one():
    # The GPU graph writes the contrast step as arithmetic (its gray mean is GPU data and cannot be an
    # operator argument); run both forms here on the CPU with fixed factors, against torchvision's order
    # (brightness clamped to 255, then contrast about the brightened image's gray mean). Values up to 230
    # with factors up to 1.3: the clamp between the two steps matters.
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from medssl_scale.augment.dali_backend import _brightness_contrast

    arrs = [smooth_image(24, i, 60, 230) for i in range(4)]
    b = [np.float32(f) for f in (0.7, 1.0, 1.3, 1.25)]
    c = [np.float32(f) for f in (0.6, 1.4, 0.7, 0.8)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: arrs, batch=True, layout="HWC")
        bb, cc = fn.external_source(source=lambda: (b, c), num_outputs=2, batch=True)
        return _brightness_contrast(x, bb, cc, fused=True), _brightness_contrast(x, bb, cc, fused=False)

    p = pipe()
    p.build()
    fused, arithmetic = (o.as_array().astype(np.float64) for o in p.run())
    for i, a in enumerate(arrs):
        x = np.clip(a.astype(np.float64) * b[i], 0, 255)
        m = (x @ np.array([0.299, 0.587, 0.114])).mean()
        ref = np.clip(m + c[i] * (x - m), 0, 255)
        assert np.abs(fused[i] - ref).max() <= 1.0 and np.abs(arithmetic[i] - ref).max() <= 1.0, i


def window_reference(a: np.ndarray, p, size: int) -> torch.Tensor:
    """PIL's bilinear resize of the crop window of `p`, mirrored where p.flip: float (3, size, size) in [0, 1]."""
    crop = Image.fromarray(a).crop((p.left, p.top, p.left + p.width, p.top + p.height))
    t = torch.from_numpy(np.asarray(crop.resize((size, size), Image.BILINEAR)).astype(np.float32) / 255)
    t = t.permute(2, 0, 1)
    return t.flip(-1) if p.flip else t


def test_two_ranks_draw_their_own_parameters_from_the_pair_seeds():
    # The same (non-square) image at entry i on two ranks; the reader gives each rank's entries their own
    # seeds (from the global sample number). Crop and flip only, so every view can be rendered by PIL
    # from the window that draw_pair gives for its seed.
    arrs = [np.ascontiguousarray(smooth_image(64, i)[:48]) for i in range(8)]
    pngs = [encode(a) for a in arrs]
    view = ViewPolicy(crop_scale=(0.2, 0.6), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    policy = AugmentPolicy(size=32, views=(view, view))
    seeds = {rank: np.random.default_rng(rank).integers(0, 2**63, 8).astype(np.uint64) for rank in (0, 1)}
    out, params = {}, {}
    for rank in (0, 1):
        _, (out[rank],) = run([raw_step(0, pngs, seeds=seeds[rank])], view)
        params[rank] = [draw_pair(s, (48, 64), (48, 64), policy) for s in seeds[rank]]
    shared = sum(params[0][i][v][:5] == params[1][i][v][:5] for i in range(8) for v in (0, 1))
    assert shared == 0  # no view shares its window and flip across the ranks
    for rank, other in ((0, 1), (1, 0)):
        for i, a in enumerate(arrs):
            for v, got in enumerate((out[rank].view1[i], out[rank].view2[i])):
                px = unnormalize(got)
                own = (px - window_reference(a, params[rank][i][v], 32)).abs()
                # Measured: own window mean 0.0009, max 0.012; the other rank's window 0.015 or more.
                assert own.mean() < 0.003 and own.max() < 0.03, (rank, i, v, float(own.mean()), float(own.max()))
                assert (px - window_reference(a, params[other][i][v], 32)).abs().mean() > 0.01, (rank, i, v)


def test_image_size_reads_headers_as_pil_does():
    a = smooth_image(64, 3)[:40, :56]
    progressive = io.BytesIO()
    Image.fromarray(a).save(progressive, "JPEG", progressive=True)
    gray = encode(np.ascontiguousarray(a[..., 0]), "JPEG")
    bmp = io.BytesIO()
    Image.fromarray(a).save(bmp, "BMP")
    for data in (encode(a, "JPEG"), encode(a, "PNG"), progressive.getvalue(), gray, bmp.getvalue()):
        assert image_size(data) == (40, 56)
    assert image_size(PLACEHOLDER_JPEG) == (8, 8)
    assert image_size(b"") is None and image_size(b"not an image") is None


# The DALI backend's outputs against the torchvision backend's on the same pairs: both apply the
# parameters draw_pair gives for the pair's seed, so the views match up to interpolation and uint8
# rounding (DALI rounds after every op; torchvision computes in float). The figures in
# docs/data-pipeline.md ("Backend differences") were measured with these policies (16 PNGs, 32 px).
_GEOMETRY = ViewPolicy(crop_scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
_AGREEMENT = {
    "crop+flip": _GEOMETRY,
    "jitter": dataclasses.replace(_GEOMETRY, jitter_p=1.0, hue=0.0),  # brightness, contrast, saturation 0.8
    "grayscale": dataclasses.replace(_GEOMETRY, grayscale_p=1.0),
    "blur": dataclasses.replace(_GEOMETRY, blur_p=1.0),
    "simclr without hue": dataclasses.replace(preset("simclr").views[0], hue=0.0),
}


def backend_views(view: ViewPolicy, arrs, size: int = 32):
    """(torchvision, DALI) views of one step of `arrs` as pixel values in [0, 255], both views stacked."""
    from medssl_scale.augment.torchvision_backend import TorchvisionAugmenter

    step = raw_step(0, [encode(a) for a in arrs] + [b""])  # PNG: both decoders give the same pixels
    _, (dali,) = run([step], view, size=size)
    tv = TorchvisionAugmenter(AugmentPolicy(size=size, views=(view, view)))(step)
    assert torch.equal(tv["valid"], dali.valid)
    both = [torch.cat([unnormalize(v1), unnormalize(v2)]) * 255 for v1, v2 in
            ((tv["view1"], tv["view2"]), (dali.view1, dali.view2))]
    return both[0], both[1]


@pytest.mark.parametrize("name", list(_AGREEMENT))
def test_both_backends_apply_the_same_draws(name):
    arrs = [smooth_image(64, i) for i in range(16)]
    tv, dali = backend_views(_AGREEMENT[name], arrs)
    diff = (tv - dali).abs()[torch.arange(34) % 17 != 16]  # padding entries left out
    # Measured: mean 0.27-0.49 levels, 99th percentile 0.9-1.9, max 2.1-7.8 (a few pixels of upscaled crops).
    assert diff.mean() < 0.7 and diff.flatten().quantile(0.99) < 3.0 and diff.max() < 16, (
        name, float(diff.mean()), float(diff.flatten().quantile(0.99)), float(diff.max()))
    # The windows are the same: another entry's parameters would be tens of levels off.
    assert (tv - dali.roll(1, 0)).abs().mean() > 10


def test_hue_is_the_op_whose_semantics_differ():
    # The documented exception: DALI's hue is a chroma rotation about the gray axis, torchvision's an HSV
    # shift. Same draws, yet the hue-only views differ by tens of levels (measured: mean 18, p99 78).
    arrs = [smooth_image(64, i) for i in range(16)]
    tv, dali = backend_views(dataclasses.replace(_GEOMETRY, jitter_p=1.0, brightness=0.0, contrast=0.0,
                                                 saturation=0.0, hue=0.2), arrs)
    assert (tv - dali).abs().mean() > 8


def test_both_backends_rotate_alike_inside_the_image():
    # Inside the rotated image the two agree as closely as without rotation (resize and uint8 rounding);
    # along its edge, a band about a pixel wide, torchvision weighs the bilinear coverage in twice (its
    # fill mask times zero-padded samples), so there they differ by tens of levels. Full-image crops, so
    # the band can be located from the drawn angle alone.
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    arrs = [smooth_image(64, i) for i in range(8)]
    view = dataclasses.replace(PLAIN, rotate_deg=45.0, flip_p=0.5)
    tv, dali = backend_views(view, arrs)
    policy = AugmentPolicy(size=32, views=(view, view))
    pairs = [draw_pair(s, (64, 64), (64, 64), policy) for s in range(8)]  # raw_step's seeds of step 0
    inside_max, edge_max = [], []
    for v in (0, 1):
        for i, pair in enumerate(pairs):
            cover = F.rotate(torch.ones(1, 32, 32), pair[v].angle, interpolation=InterpolationMode.BILINEAR,
                             fill=0.0)[0]
            inside = torch.nn.functional.max_pool2d((cover < 0.999).float()[None], 3, 1, 1)[0] == 0
            diff = (tv[v * 9 + i] - dali[v * 9 + i]).abs()  # 9 rows per view: 8 entries and a padding one
            inside_max.append(float(diff[:, inside].max()))
            edge_max.append(float(diff[:, ~inside].max()))
    # Measured: inside at most 1.7 levels; the edge band up to 57.
    assert max(inside_max) < 2.5, inside_max
    assert max(edge_max) > 10, edge_max
