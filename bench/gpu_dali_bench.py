"""DaliPairLoader checks for a GPU machine (or, with --device cpu, a dry run): one JSON line per check.

    python bench/gpu_dali_bench.py --device 0                      # the H200 checks (bench/gpu_check.sh)
    python bench/gpu_dali_bench.py --device cpu --size 64 --batch 16 --images 64 --steps 3   # dry run

Checks, in this order: "decode_mode" (first, unless --decode-once on|off is given: one SimCLR step and one
MICLe-like step (half the pairs two different images, so both sides of the `if same:` in the pipeline hold
samples) through the loader with decode_once=True, i.e. the decoder inside a DALI conditional (on the GPU
the mixed nvJPEG decoder, never verified there before), against decode_once=False (no decoder inside a
conditional) on the same draws. decode_once=True is chosen only if it runs and matches; the choice is the
line's "decode_once" and every later check (and bench/gpu_train_bench.py, through bench/gpu_check.sh)
uses it), "throughput" (pairs/s of the simclr policy on synthetic JPEGs, after warm-up; goal 10,000 at 224 px,
batch 256 on a GPU), "bf16" (dtype, device, finite values, zeroed padding), "corrupt" (padding, a truncated
JPEG, a zero-sized frame (found by the header read) and one only the decoder rejects (a bogus Huffman table
index): valid flags, zeros, count, recovery by probing with the same decoder), "semantics" (full-crop + flip
against the CPU pipeline, grayscale, contrast keeping the gray mean, and the whole dermatology policy on the
GPU against the CPU: both apply the same host-side draws, so they differ only by the ops' implementations).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from medssl_scale.augment.policy import AugmentPolicy, ViewPolicy, preset  # noqa: E402
from medssl_scale.data.batch import RawPairBatch  # noqa: E402

PLAIN = ViewPolicy(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
                   blur_p=0.0)


def DaliPairLoader(*args, **kwargs):  # noqa: N802 - DALI imported on first use: bench/gpu_eval_bench.py
    from medssl_scale.augment.dali_backend import DaliPairLoader as loader  # reuses this file without it
    return loader(*args, **kwargs)


def emit(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def synthetic_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """n JPEGs of about size x size px (sides vary by +-15 %): smooth colour fields, shapes and noise,
    so that they compress like photographs (~10-20 KB at 224 px), not like flat colour."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(size * rng.uniform(0.85, 1.15)) for _ in range(2))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            fx, fy, ph = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
            img[..., c] = 128 + 90 * np.sin(2 * np.pi * (fx * x / w + fy * y / h) + ph)
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.3) * min(h, w)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] *= rng.uniform(0.3, 0.9, 3)
        img += rng.normal(0, 12, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class ListPairSource:
    """SimCLR pairs (the same bytes twice) cycling over `images`; `steps` steps of `batch_size` per epoch."""

    def __init__(self, images: list[bytes], batch_size: int, steps: int):
        self.images, self.batch_size, self.steps = images, batch_size, steps

    def steps_per_epoch(self) -> int:
        return self.steps

    def batches(self, epoch, start_step=0, worker=0, num_workers=1):
        n, b = len(self.images), self.batch_size
        for step in range(start_step + worker, self.steps, num_workers):
            idx = [(step * b + i) % n for i in range(b)]
            first = [self.images[i] for i in idx]
            yield RawPairBatch(epoch=epoch, step=step, first=first, second=first,
                               patient=np.asarray(idx, np.int64), valid=np.ones(b, bool),
                               keys=[(f"synthetic#{i}.jpg", f"synthetic#{i}.jpg") for i in idx],
                               seeds=np.arange(step * b, step * b + b, dtype=np.uint64))


class FixedSource:
    """The given steps, in order."""

    def __init__(self, steps: list[RawPairBatch]):
        self.steps, self.batch_size = steps, len(steps[0])

    def steps_per_epoch(self) -> int:
        return len(self.steps)

    def batches(self, epoch, start_step=0, worker=0, num_workers=1):
        for s in range(start_step + worker, len(self.steps), num_workers):
            yield dataclasses.replace(self.steps[s], epoch=epoch)


def raw_step(step: int, images: list[bytes]) -> RawPairBatch:
    n = len(images)
    valid = np.array([bool(b) for b in images])
    return RawPairBatch(epoch=0, step=step, first=list(images), second=list(images),
                        patient=np.where(valid, np.arange(n), -1).astype(np.int64), valid=valid,
                        keys=[(f"check#{step}_{i}.jpg",) * 2 if valid[i] else ("", "") for i in range(n)],
                        seeds=np.zeros(n, np.uint64))


def sync(device_id) -> None:
    if device_id is not None:
        torch.cuda.synchronize(device_id)


def _views(loader) -> tuple[list[torch.Tensor], list[list[bool]]]:
    """Every step's two views (CPU float, 0-255 levels) and valid flags."""
    mean = torch.tensor(AugmentPolicy().mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(AugmentPolicy().std).view(1, 3, 1, 1) * 255
    loader.set_epoch(0)
    views, valid = [], []
    for batch in loader:
        views.append(torch.cat([batch.view1, batch.view2]).float().cpu() * std + mean)
        valid.append(batch.valid.tolist())
    return views, valid


def check_decode_mode(args, device_id, images) -> None:
    """Choose decode_once for every later check: True only if the decoder inside the conditional runs and
    gives what two unconditional decoders give (same draws: only the decode path differs)."""
    b = min(args.batch, 32)
    imgs = images[:b]
    simclr = RawPairBatch(epoch=0, step=0, first=list(imgs), second=list(imgs),
                          patient=np.arange(b, dtype=np.int64), valid=np.ones(b, bool),
                          keys=[(f"mode#0_{i}.jpg",) * 2 for i in range(b)],
                          seeds=np.arange(b, dtype=np.uint64))
    # MICLe-like: even entries pair two different images of a "patient", odd ones the same image twice;
    # the last entry is padding.
    second = [imgs[(i + 1) % b] if i % 2 == 0 else imgs[i] for i in range(b)]
    valid = np.ones(b, bool)
    valid[-1] = False
    micle = RawPairBatch(epoch=0, step=1, first=list(imgs[:-1]) + [b""], second=second[:-1] + [b""],
                         patient=np.where(valid, np.arange(b), -1).astype(np.int64), valid=valid,
                         keys=[(f"mode#1_{i}a.jpg", f"mode#1_{i}b.jpg") if valid[i] else ("", "")
                               for i in range(b)],
                         seeds=np.arange(b, 2 * b, dtype=np.uint64))
    policy = preset("simclr", size=args.size)
    source = FixedSource([simclr, micle])

    def run(decode_once: bool):
        return _views(DaliPairLoader(source, policy, device_id=device_id, num_threads=args.threads[-1],
                                     decode_once=decode_once))

    ref, ref_valid = run(False)
    fields = {"device": describe(device_id), "batch": b, "steps": 2}
    try:
        got, got_valid = run(True)
    except Exception as e:  # noqa: BLE001 - e.g. the mixed decoder refused inside a conditional
        args.decode_once = False
        emit(check="decode_mode", ok=True, decode_once=False, decode_once_ran=False,
             reason="decode_once=True raised", error=f"{type(e).__name__}: {str(e)[:1500]}", **fields)
        return
    # numpy's percentile: torch.quantile refuses inputs over 2**24 elements (2 steps x 64 views at 224 px)
    diff = torch.cat([(g - r).abs().flatten() for g, r in zip(got, ref)]).numpy()
    mean, p99, top = float(diff.mean()), float(np.percentile(diff, 99)), float(diff.max())
    # nvJPEG may send a batch's images to the hardware or the CUDA decoder by batch size, and the conditional
    # splits the batch: allow the last-bit differences of two JPEG decoders, no more.
    same = got_valid == ref_valid and mean <= 0.5 and p99 <= 4.0
    args.decode_once = bool(same)
    emit(check="decode_mode", ok=True, decode_once=args.decode_once, decode_once_ran=True,
         matches_two_decoders=bool(same), valid_equal=got_valid == ref_valid,
         levels_vs_two_decoders={"mean": round(mean, 4), "p99": round(p99, 2), "max": round(top, 1)},
         reason=None if same else "decode_once=True differs from decoding twice", **fields)


def check_throughput(args, device_id, images) -> None:
    for threads in args.threads:
        measure_throughput(args, device_id, images, threads, decode_once=args.decode_once)


def measure_throughput(args, device_id, images, threads: int, decode_once: bool) -> None:
    policy = preset("simclr", size=args.size)
    steps = args.warmup + args.steps
    loader = DaliPairLoader(ListPairSource(images, args.batch, steps), policy, device_id=device_id,
                            num_threads=threads, prefetch_queue_depth=args.prefetch, seed=1,
                            decode_once=decode_once)
    loader.set_epoch(0)
    t_build = time.perf_counter()
    it = iter(loader)
    for _ in range(args.warmup):
        batch = next(it)
    sync(device_id)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += 1
        checksum = batch.view1[:, :, 0, 0].sum()  # touch the data: the consumer waits for the copy
    sync(device_id)
    float(checksum)
    dt = time.perf_counter() - t0
    pairs_per_s = n * args.batch / dt
    emit(check="throughput", backend="dali", device=describe(device_id), size=args.size, batch=args.batch,
         threads=threads, decode_once=decode_once, prefetch=args.prefetch, warmup_steps=args.warmup, steps=n,
         warmup_s=round(t0 - t_build, 2), seconds=round(dt, 3), pairs_per_s=round(pairs_per_s, 1),
         goal_pairs_per_s=args.goal, ok=bool(pairs_per_s >= args.goal) if device_id is not None else None)


def check_bf16(args, device_id, images) -> None:
    policy = dataclasses.replace(preset("simclr", size=args.size), dtype="bfloat16")
    b = args.batch
    step = raw_step(0, images[: b - 1] + [b""])  # the last entry is padding
    loader = DaliPairLoader(FixedSource([step]), policy, device_id=device_id, num_threads=args.threads[-1],
                            decode_once=args.decode_once)
    loader.set_epoch(0)
    (batch,) = list(loader)
    v1, v2 = batch.view1, batch.view2
    want_device = "cpu" if device_id is None else f"cuda:{device_id}"
    ok = (v1.dtype == v2.dtype == torch.bfloat16 and str(v1.device) == want_device
          and tuple(v1.shape) == (b, 3, args.size, args.size) and bool(torch.isfinite(v1.float()).all())
          and bool(torch.isfinite(v2.float()).all()) and not bool(batch.valid[-1]) and bool(batch.valid[:-1].all())
          and float(v1[-1].abs().max()) == 0.0 and float(v1[:-1].float().abs().amax(dim=(1, 2, 3)).min()) > 0
          and batch.patient.dtype == torch.int64 and str(batch.valid.device) == want_device)
    emit(check="bf16", ok=ok, dtype=str(v1.dtype), device=str(v1.device), shape=list(v1.shape),
         min=float(v1.float().min()), max=float(v1.float().max()), finite=bool(torch.isfinite(v1.float()).all()),
         padding_zero=float(v1[-1].abs().max()) == 0.0)


def check_corrupt(args, device_id, images) -> None:
    good = images[:6]
    truncated = good[0][: len(good[0]) // 2]
    sof = good[1].find(b"\xff\xc0")
    zero_size = good[1][: sof + 5] + b"\0\0\0\0" + good[1][sof + 9:] if sof > 0 else b"garbage"
    dht = good[3].find(b"\xff\xc4")
    bogus = good[3][: dht + 4] + b"\x2f" + good[3][dht + 5:] if dht > 0 else b"garbage"
    steps = [raw_step(0, [good[0], b"", truncated, good[1], zero_size, good[2]]),
             raw_step(1, good[:3] + [bogus] + good[4:]), raw_step(2, good)]
    loader = DaliPairLoader(FixedSource(steps), AugmentPolicy(size=args.size), device_id=device_id,
                            num_threads=args.threads[-1], decode_once=args.decode_once)
    loader.set_epoch(0)
    out = list(loader)
    valid = [b.valid.tolist() for b in out]
    zeros = all(bool((v[~b.valid] == 0).all()) for b in out for v in (b.view1, b.view2))
    want = [[True, False, False, True, False, True], [True, True, True, False, True, True], [True] * 6]
    emit(check="corrupt", ok=valid == want and zeros and loader.corrupt_skipped == 3 and loader.pipeline_builds == 2,
         valid=valid, zeros_where_invalid=zeros, corrupt_skipped=loader.corrupt_skipped,
         pipeline_builds=loader.pipeline_builds)
    loader = DaliPairLoader(FixedSource(steps), AugmentPolicy(size=args.size), device_id=device_id,
                            num_threads=args.threads[-1], on_corrupt="error", decode_once=args.decode_once)
    loader.set_epoch(0)
    try:
        list(loader)
        emit(check="corrupt_error_mode", ok=False, error="nothing raised")
    except ValueError as e:
        emit(check="corrupt_error_mode", ok="check#0_2.jpg" in str(e), message=str(e)[:300])


def check_semantics(args, device_id, images) -> None:
    """GPU ops against the CPU pipeline where the policy leaves no randomness but flips and coin draws."""
    b = min(args.batch, 16)
    sq = []
    for data in images[:b]:  # square crops, so a full-area, ratio-1 crop is the whole image
        im = Image.open(io.BytesIO(data)).convert("RGB")
        s = min(im.size)
        buf = io.BytesIO()
        im.crop((0, 0, s, s)).save(buf, "PNG")  # PNG: no JPEG decoder differences between CPU and GPU
        sq.append(buf.getvalue())
    step = [raw_step(0, sq)]
    mean = torch.tensor(AugmentPolicy().mean).view(1, 3, 1, 1)
    std = torch.tensor(AugmentPolicy().std).view(1, 3, 1, 1)

    def run(view, dev, both=False):
        loader = DaliPairLoader(FixedSource(step), AugmentPolicy(size=args.size, views=(view, view)),
                                device_id=dev, num_threads=args.threads[-1], decode_once=args.decode_once)
        loader.set_epoch(0)
        (batch,) = list(loader)
        views = torch.cat([batch.view1, batch.view2]) if both else batch.view1
        return views.float().cpu() * std + mean

    flip = dataclasses.replace(PLAIN, flip_p=1.0)
    gpu, cpu = run(flip, device_id), run(flip, None)
    flip_diff = float((gpu - cpu).abs().mean())
    gray = run(dataclasses.replace(PLAIN, grayscale_p=1.0), device_id)
    gray_spread = float((gray.max(1).values - gray.min(1).values).max())
    contrast = run(dataclasses.replace(PLAIN, jitter_p=1.0, brightness=0.0, contrast=0.5, saturation=0.0, hue=0.0),
                   device_id)
    plain = run(PLAIN, device_id)
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    # clipping can move the mean a little where a factor of 1.5 pushes pixels past 0 or 1
    mean_shift = float(((contrast * w).sum(1).mean((1, 2)) - (plain * w).sum(1).mean((1, 2))).abs().max())
    changed = float((contrast - plain).abs().mean())
    # Every op of a policy at once (crop, flip, rotation, jitter with hue, grayscale, blur): the same draws
    # on both devices (made on the host from the pair seeds), so only implementations differ.
    derm = preset("dermatology").views[0]
    policy_diff = (run(derm, device_id, both=True) - run(derm, None, both=True)).abs() * 255
    policy_mean, policy_p99 = float(policy_diff.mean()), float(policy_diff.flatten().quantile(0.99))
    ok = (flip_diff < 0.01 and gray_spread < 2 / 255 and mean_shift < 0.03 and changed > 0.005
          and policy_mean < 1.0 and policy_p99 < 8.0)
    emit(check="semantics", ok=ok,
         flip_gpu_vs_cpu_mean_abs=round(flip_diff, 5), gray_channel_spread=round(gray_spread, 5),
         contrast_gray_mean_shift=round(mean_shift, 5), contrast_mean_abs_change=round(changed, 4),
         dermatology_gpu_vs_cpu_levels={"mean": round(policy_mean, 3), "p99": round(policy_p99, 2),
                                        "max": round(float(policy_diff.max()), 1)})


def describe(device_id) -> str:
    return "cpu" if device_id is None else torch.cuda.get_device_name(device_id)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="0", help="CUDA device index, or 'cpu' for a CPU-only dry run")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, nargs="+", default=[8])
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--goal", type=float, default=10000.0)
    ap.add_argument("--checks", nargs="+", default=["throughput", "bf16", "corrupt", "semantics"])
    ap.add_argument("--decode-once", choices=("auto", "on", "off"), default="auto",
                    help="auto: the decode_mode check runs first and chooses for every later check")
    args = ap.parse_args()
    checks = [c for c in args.checks if c != "decode_mode"]
    if args.decode_once == "auto":
        args.decode_once = False  # what the later checks get if decode_mode itself fails
        checks.insert(0, "decode_mode")
    else:
        args.decode_once = args.decode_once == "on"
        emit(check="decode_mode", ok=True, decode_once=args.decode_once, reason="given by --decode-once")
    device_id = None if args.device == "cpu" else int(args.device)
    t0 = time.perf_counter()
    images = synthetic_jpegs(args.images, args.size)
    emit(check="data", images=len(images), mean_bytes=int(np.mean([len(b) for b in images])),
         seconds=round(time.perf_counter() - t0, 2))
    failed = 0
    for name in checks:
        try:
            globals()[f"check_{name}"](args, device_id, images)
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            failed += 1
            emit(check=name, ok=False, error=f"{type(e).__name__}: {str(e)[:1500]}",
                 trace=traceback.format_exc()[-1500:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
