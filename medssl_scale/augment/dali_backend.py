"""The DALI augmentation backend: encoded pairs in, normalized view tensors out (GPU, or CPU-only)."""

from __future__ import annotations

import io
import re
import struct
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import Pipeline, pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from medssl_scale.augment.policy import AugmentPolicy, ViewParams, ViewPolicy, draw_pair, neutral_params
from medssl_scale.data.batch import CorruptImage, EpochCursor, PairBatch, PairSource, RawPairBatch

_LUMA = (0.299, 0.587, 0.114)          # ITU-R 601, as torchvision's rgb_to_grayscale and DALI's hsv
# Formats DALI's decoders read (PIL's names); anything else is treated as corrupt before it gets there.
_DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"}


def _make_placeholder() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# Padding and corrupt entries are fed to the decoder as this tiny valid JPEG (their outputs are zeroed
# afterwards): a DALI batch cannot skip a sample, and one undecodable sample fails the whole batch.
PLACEHOLDER_JPEG = _make_placeholder()
_PLACEHOLDER = np.frombuffer(PLACEHOLDER_JPEG, np.uint8)
_PLACEHOLDER_PARAMS = neutral_params(8, 8)
_TRUE, _FALSE = np.array(True), np.array(False)
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic ...): C0-CF but DHT, JPG, DAC.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def probe_decode(data: bytes) -> str | None:
    """Fully decode `data` with PIL: None when it is a whole image in a format DALI reads, else why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning and friends: size is not our concern
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in _DALI_FORMATS:
                    return f"format {im.format} is not decodable by DALI"
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data; all mean "corrupt"
        why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(bytes)", str(e))
        return f"undecodable image ({len(data)} bytes): {why[:120]}"
    return None


def check_encoded(data: bytes) -> str | None:
    """A cheap test (microseconds for JPEG/PNG) that `data` is a whole image: None if fine, else why not.

    JPEG must start with SOI and have EOI near its end (a truncated file, the usual corruption, lacks it:
    0xFFD9 cannot occur inside entropy-coded data); PNG must end with its IEND chunk. Anything else, or a
    file that fails these, gets the full PIL decode of `probe_decode`. What slips through (a file damaged in
    the middle) makes DALI fail the batch, and the loader then probes that batch fully and retries.
    """
    if not data:
        return "empty image bytes"
    if data[:3] == b"\xff\xd8\xff" and b"\xff\xd9" in data[-1024:]:
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[-12:-4] == b"\x00\x00\x00\x00IEND":
        return None
    return probe_decode(data)


def _dali_reason(err: Exception) -> str:
    """The operator's own message out of a DALI pipeline error (between 'encountered:' and the context)."""
    text = str(err)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith(("C++ context", "Current pipeline object"))]
    return lines[0][:200] if lines else type(err).__name__


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of an encoded image from its header, as DALI decodes it here (EXIF orientation not
    applied, like torchvision's decode_image); None if unreadable or empty.

    JPEG (the SOF segment) and PNG (IHDR) are parsed directly in a few microseconds (PIL's Image.open takes
    ~50-150 us, which at batch 256 would cost the feeding thread tens of ms per step); other formats use PIL.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        width, height = struct.unpack_from(">II", data, 16)
        return (height, width) if height and width else None
    if data[:2] == b"\xff\xd8":
        i, n = 2, len(data)
        while i + 9 <= n and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF:                         # fill byte before a marker
                i += 1
            elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
            elif marker in _SOF_MARKERS:
                height, width = struct.unpack_from(">HH", data, i + 5)
                return (height, width) if height and width else None
            else:
                i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Exception:  # noqa: BLE001 - PIL raises many types for bad data; all mean "no size"
        return None
    return (height, width) if height and width else None


def _param_names(view: ViewPolicy) -> tuple[str, ...]:
    """The parameters a view's graph takes from the host, in feeding order: only those its policy uses
    (DALI warns about, and still copies, unused external_source outputs)."""
    jitter = view.jitter_p > 0
    names = ["roi_start", "roi_end"]
    if view.rotate_deg > 0:
        names.append("angle")
    if jitter and view.brightness > 0:
        names.append("brightness")
    if jitter and view.contrast > 0:
        names.append("contrast")
    if (jitter and view.saturation > 0) or view.grayscale_p > 0:
        names.append("saturation")
    if jitter and view.hue > 0:
        names.append("hue")
    if view.blur_p > 0:
        names += ["blur", "sigma"]
    return tuple(names)


def _param_arrays(params: list[ViewParams], names: tuple[str, ...]) -> list[np.ndarray]:
    """One view's parameters as per-sample batches for DALI: (B, 2) float32 ROIs, (B,) scalars, (B,) bool.

    The ROI is the crop window in (y, x) order, with its x ends swapped where the view is flipped: DALI's
    resize mirrors a region whose start exceeds its end, so the flip happens after the crop and before the
    rotation, as in the torchvision backend. Grayscale is folded into saturation (0: hsv then gives the
    ITU-R 601 luma in all three channels, as Grayscale(3) after the jitter).
    """
    col = dict(zip(ViewParams._fields, np.array(params, dtype=np.float64).T))  # bools as 0/1
    top, left, flip = col["top"], col["left"], col["flip"] > 0
    right = left + col["width"]
    values = dict(col, roi_start=np.stack([top, np.where(flip, right, left)], 1),
                  roi_end=np.stack([top + col["height"], np.where(flip, left, right)], 1),
                  saturation=col["saturation"] * (1.0 - col["grayscale"]),
                  hue=360.0 * col["hue"])  # turns -> degrees, fn.hsv's unit
    return [values["blur"] > 0 if name == "blur" else np.ascontiguousarray(values[name], dtype=np.float32)
            for name in names]


@dataclass
class _Fed:
    """One step as handed to DALI, kept on the Python side until its outputs come back (FIFO)."""

    raw: RawPairBatch
    first: list[np.ndarray]
    second: list[np.ndarray]     # the placeholder where `same`: that entry is not decoded again
    same: list[np.ndarray]       # bool scalars: view 2 comes from the same image as view 1
    valid: np.ndarray            # bool (B,): raw.valid minus corrupt entries
    corrupt: int                 # pairs dropped as corrupt in this step
    params: tuple[list[ViewParams], list[ViewParams]]  # each view's draws, kept for a replay after a recovery
    error: str | None = None     # first corrupt image, named by key (raised at this step when on_corrupt="error")

    def drop(self, i: int, which: int, reason: str) -> None:
        self.first[i] = self.second[i] = _PLACEHOLDER
        self.same[i] = _TRUE
        self.params[0][i] = self.params[1][i] = _PLACEHOLDER_PARAMS
        if self.valid[i]:
            self.valid[i] = False
            self.corrupt += 1
            if self.error is None:
                key = self.raw.keys[i][which] if i < len(self.raw.keys) else f"entry {i}"
                self.error = f"{key} (epoch {self.raw.epoch}, step {self.raw.step}): {reason}"


def _prepare(raw: RawPairBatch, policy: AugmentPolicy, decode_once: bool = True, check=check_encoded) -> _Fed:
    """One step's DALI inputs: encoded images (placeholders where padding or corrupt) and every view's
    parameters, drawn here from the pair's seed and image sizes (`draw_pair`, as the torchvision backend)."""
    n = len(raw)
    fed = _Fed(raw=raw, first=[_PLACEHOLDER] * n, second=[_PLACEHOLDER] * n, same=[_TRUE] * n,
               valid=np.asarray(raw.valid, dtype=bool).copy(), corrupt=0,
               params=([_PLACEHOLDER_PARAMS] * n, [_PLACEHOLDER_PARAMS] * n))
    for i in range(n):
        if not fed.valid[i]:
            continue  # padding: placeholder in, zeros out
        a, b = raw.first[i], raw.second[i]
        reason = check(a)
        size_a = image_size(a) if reason is None else None
        if size_a is None:
            fed.drop(i, 0, reason or "unreadable image header (no size)")
            continue
        same = b is a or b == a  # SimCLR pairs carry the same bytes twice: check and decode once
        reason = None if same else check(b)
        size_b = size_a if same else image_size(b) if reason is None else None
        if size_b is None:
            fed.drop(i, 1, reason or "unreadable image header (no size)")
            continue
        fed.params[0][i], fed.params[1][i] = draw_pair(raw.seeds[i], size_a, size_b, policy)
        fed.first[i] = np.frombuffer(a, np.uint8)
        if not same:
            fed.second[i], fed.same[i] = np.frombuffer(b, np.uint8), _FALSE
        elif not decode_once:
            fed.second[i] = fed.first[i]
    return fed


def _gray_mean(x):
    """Per-sample mean of the ITU-R 601 luma of HWC `x` (a scalar per sample, on x's device)."""
    channel_means = fn.reductions.mean(x, axes=[0, 1])                       # (3,)
    return fn.reductions.sum(channel_means * types.Constant(np.float32(_LUMA)), axes=[0])


def _brightness_contrast(x, brightness, contrast, fused: bool):
    """torchvision's adjust_brightness then adjust_contrast (about the brightened image's gray mean), uint8
    in and out; None skips a factor.

    The brightness pass saturates at 255, which is torchvision's clamp before the contrast step (folding
    both into one pass skips that clamp: 2 levels mean and up to 15 per image off torchvision's output
    at SimCLR strength, measured on the test images). On the CPU the contrast is a brightness_contrast
    pass with the gray mean as its contrast_center. On the GPU the mean is GPU data and an operator's
    argument inputs must be CPU data, so the same formula is written as arithmetic.
    """
    if brightness is not None:
        x = fn.brightness_contrast(x, brightness=brightness)
    if contrast is None:
        return x
    mean = _gray_mean(x)
    if fused:
        return fn.brightness_contrast(x, contrast=contrast, contrast_center=mean)
    y = x * contrast + mean * (1.0 - contrast)
    return fn.cast(dmath.clamp(y, 0.0, 255.0), dtype=types.UINT8)


def _gaussian_blur(x, window: int, sigma, on_gpu: bool):
    """Separable Gaussian blur of HWC `x`: a (1, window) then a (window, 1) filter, sigma per sample.

    Same result as fn.gaussian_blur(window_size=window, sigma=sigma) (and torchvision's gaussian_blur: the
    same normalized kernel, reflect-101 borders), but fn.filter is ~5x faster on the CPU (1.8 vs 10 ms per
    224-px uint8 image at window 23 here). The kernels are built per sample from sigma by CPU ops.
    """
    r2 = types.Constant(np.square(np.arange(window, dtype=np.float32) - window // 2))
    weights = dmath.exp(r2 * (-0.5 / (sigma * sigma)))
    weights = weights / fn.reductions.sum(weights, axes=[0])
    row, col = fn.reshape(weights, shape=[1, window]), fn.reshape(weights, shape=[window, 1])
    if on_gpu:
        row, col = row.gpu(), col.gpu()
    return fn.filter(fn.filter(x, row), col)


def _view_graph(img, view: ViewPolicy, policy: AugmentPolicy, on_gpu: bool, p: dict):
    """DALI ops for one view of decoded uint8 HWC `img` (on the CPU or GPU, like `img`): normalized CHW.

    `p` holds the view's parameters drawn on the host (`_param_names` of `view`; CPU data, as argument inputs
    must be), so the graph has no random op: its outputs depend on the images and those draws only. Ops a
    policy never uses are left out of the graph; where a sample's draw says "off" its parameters are
    neutral (factor 1, hue 0), except blur, which runs only where the sample's predicate says so (a DALI
    conditional, which splits the batch). Pixels stay uint8 between ops, as in DALI's own fused colour ops,
    which round and saturate their outputs.
    """
    size = policy.size
    # The crop window (flipped where drawn) resized in one pass: torchvision's crop then resize, antialiased.
    x = fn.resize(img, size=[size, size], roi_start=p["roi_start"], roi_end=p["roi_end"], roi_relative=False,
                  interp_type=types.INTERP_LINEAR, antialias=True)
    if "angle" in p:
        x = fn.rotate(x, angle=p["angle"], keep_size=True, fill_value=0.0, interp_type=types.INTERP_LINEAR)
    x = _brightness_contrast(x, p.get("brightness"), p.get("contrast"), fused=not on_gpu)
    if "saturation" in p or "hue" in p:
        # One linear map in RGB for both: saturation scales chroma about the luma axis (torchvision's blend
        # with grayscale, the same map); hue rotates chroma about that axis. The rotation is DALI's linear
        # stand-in for an HSV hue shift and NOT torchvision's adjust_hue: it keeps luma where HSV keeps
        # value and saturation, and it moves colours further (red +30 deg: (200,40,40) -> (171,73,0) here,
        # (200,120,40) in HSV), so hue jitter differs between the backends.
        x = fn.hsv(x, saturation=p.get("saturation", 1.0), hue=p.get("hue", 0.0))
    if "blur" in p:
        if p["blur"]:
            x = _gaussian_blur(x, view.blur_kernel(size), p["sigma"], on_gpu)
    dtype = types.FLOAT16 if policy.dtype == "bfloat16" else types.FLOAT
    return fn.crop_mirror_normalize(x, dtype=dtype, output_layout="CHW",
                                    mean=[255.0 * m for m in policy.mean], std=[255.0 * s for s in policy.std])


class DaliPairLoader(EpochCursor):
    """Iterates one epoch of PairBatch in step order, augmented by a DALI pipeline.

    `device_id=None`: a CPU-only pipeline (libjpeg-turbo decode, CPU ops), tensors on the CPU. An int: nvJPEG
    decode (`mixed`) and the ops on that GPU, tensors on `cuda:<device_id>`. The cursor (epoch, step) works
    as in TorchvisionPairLoader: call `set_epoch` before each epoch; `state_dict()` names the first step not
    yet yielded and `load_state_dict` resumes there.

    Randomness: none inside DALI. Every parameter of each view (crop window, flip, angle, jitter factors,
    grayscale, blur and sigma) is drawn on the host by `policy.draw_pair` from the pair's seed
    (RawPairBatch.seeds, which the source derives from (seed, epoch, global sample number)) and the image
    sizes read from the encoded headers. So a pair's views depend on its seed and bytes only: ranks draw
    independently, `num_threads` changes nothing, a loader resumed at step k yields exactly the tensors an
    uninterrupted one yields there, and steps replayed after a decode failure get their own draws again.
    The torchvision backend draws the very same parameters for the same pair; its outputs differ from these
    only by interpolation and uint8 rounding, and by hue, where DALI's op is a chroma rotation rather than
    an HSV hue shift (see `_view_graph` and docs/data-pipeline.md for measured differences).
    `seed` is accepted for callers that pass one and not used: the source's seed is the one that counts.
    """

    def __init__(self, source: PairSource, policy: AugmentPolicy, device_id: int | None = None,
                 num_threads: int = 2, on_corrupt: str = "skip", seed: int = 0, prefetch_queue_depth: int = 2,
                 decode_once: bool = True):
        if on_corrupt not in ("skip", "error"):
            raise ValueError(f"on_corrupt must be 'skip' or 'error', not {on_corrupt!r}")
        if policy.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"policy dtype must be float32 or bfloat16, not {policy.dtype!r}")
        self.source, self.policy = source, policy
        self.device_id = device_id
        self.device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
        self.num_threads, self.on_corrupt = num_threads, on_corrupt
        self._names = tuple(_param_names(v) for v in policy.views)
        self.prefetch_queue_depth = prefetch_queue_depth
        self.decode_once = decode_once
        self.batch_size = int(source.batch_size)
        self.epoch, self.step = 0, 0
        self.corrupt_skipped = 0
        self.pipeline_builds = 0  # one per epoch entered, plus one per recovery from a DALI decode failure
        self._raws: Iterator[RawPairBatch] | None = None
        self._replay: deque[_Fed] = deque()     # steps to feed again after a recovery, before new ones
        self._inflight: deque[_Fed] = deque()   # fed to DALI, outputs not yet taken, in feeding order
        self._feed_error: Exception | None = None
        self._copied = None  # torch.cuda.Event after the last outputs' copy

    # -- cursor (set_epoch, state_dict, load_state_dict come from EpochCursor) -------------------------
    def __len__(self) -> int:
        """Steps left in the current epoch from the cursor."""
        return max(0, self.source.steps_per_epoch() - self.step)

    # -- pipeline --------------------------------------------------------------------------------------
    def _feed(self):
        """DALI's external_source callback: the next step's encoded images and both views' parameters, in
        `_build`'s order (StopIteration ends the epoch).

        DALI calls it from this thread, up to prefetch_queue_depth steps ahead of the outputs, in order;
        so the side data (valid, patient, keys) waits in a FIFO and pairs up with outputs by position.
        A replayed step is fed from its kept _Fed: the same draws as the first time.
        """
        try:
            fed = (self._replay.popleft() if self._replay
                   else _prepare(next(self._raws), self.policy, self.decode_once))
        except StopIteration:
            raise
        except Exception as e:  # the source's own error: re-raised as is, not taken for a DALI failure
            self._feed_error = e
            raise
        self._inflight.append(fed)
        images = [fed.first, fed.second, fed.same] if self.decode_once else [fed.first, fed.second]
        return (*images, *_param_arrays(fed.params[0], self._names[0]),
                *_param_arrays(fed.params[1], self._names[1]))

    def _build(self) -> Pipeline:
        on_gpu = self.device_id is not None
        decode_device = "mixed" if on_gpu else "cpu"
        n_images = 3 if self.decode_once else 2
        n1, n2 = (len(names) for names in self._names)

        # No seed: the graph has no random op (every draw is made on the host, see _prepare).
        # enable_conditionals: the `if`s in the graph (here and in _view_graph) run each branch only on the
        # samples whose predicate (a per-sample CPU bool) selects it.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch_queue_depth, enable_conditionals=True)
        def pairs():
            # All CPU: the parameters are argument inputs, which must be CPU data even when the ops run on
            # the GPU; the encoded images go to the (mixed) decoder, which takes CPU input.
            outs = fn.external_source(source=self._feed, num_outputs=n_images + n1 + n2, batch=True, device="cpu")
            enc1, enc2, same = outs[0], outs[1], outs[2] if self.decode_once else None
            p1 = dict(zip(self._names[0], outs[n_images:n_images + n1]))
            p2 = dict(zip(self._names[1], outs[n_images + n1:]))
            # adjust_orientation=False: the crop windows were drawn for the stored (header) size, and the
            # torchvision backend does not apply EXIF orientation either (shards store it applied).
            decode = dict(device=decode_device, output_type=types.RGB, adjust_orientation=False)
            img1 = fn.decoders.image(enc1, **decode)
            if not self.decode_once:
                img2 = fn.decoders.image(enc2, **decode)
            elif same:  # SimCLR pairs (and MICLe patients with one image) carry one image twice: decode once
                img2 = img1
            else:
                img2 = fn.decoders.image(enc2, **decode)
            return (_view_graph(img1, self.policy.views[0], self.policy, on_gpu, p1),
                    _view_graph(img2, self.policy.views[1], self.policy, on_gpu, p2))

        pipe = pairs()
        pipe.build()
        self.pipeline_builds += 1
        return pipe

    def _recover(self, err: Exception) -> None:
        """After DALI failed to decode: find the bad images still in flight, drop them, queue the steps again
        (with the draws they had; dropped entries become placeholders).

        Suspects are probed with PIL first, then (if PIL accepts them all, as it does some files nvJPEG
        rejects) one by one with DALI's own decoder. Raises if no image is to blame.
        """
        pending = list(self._inflight)
        self._inflight.clear()
        suspects = [(fed, int(i), which, data) for fed in pending for i in np.flatnonzero(fed.valid)
                    for which, data in ((0, fed.raw.first[i]), (1, fed.raw.second[i]))
                    if which == 0 or data != fed.raw.first[i]]
        reasons = [probe_decode(data) for *_, data in suspects]
        if not any(reasons):
            reasons = self._dali_probe([data for *_, data in suspects])
        dali_said = _dali_reason(err)
        for (fed, i, which, _), reason in zip(suspects, reasons):
            if reason is not None and fed.valid[i]:
                fed.drop(i, which, f"{reason} (DALI: {dali_said})")
        if not any(reasons):
            steps = [f.raw.step for f in pending] or ["?"]
            raise RuntimeError(f"DALI pipeline failed on epoch {self.epoch} steps {steps[0]}..{steps[-1]}, "
                               f"yet every image there decodes alone: {err}") from err
        self._replay.extend(pending)

    def _dali_probe(self, images: list[bytes]) -> list[str | None]:
        """Decode each image alone with this loader's DALI decoder: None where it works, else a reason."""
        decode_device = "cpu" if self.device_id is None else "mixed"
        current: list[bytes] = [b""]
        reasons: list[str | None] = []
        pipe = None
        for data in images:
            if pipe is None:  # a pipeline that failed is dead: a new one after each failure
                # prefetch_queue_depth=1: each run() calls the source once, for its own output, so the
                # callback reads `current` as set for this very run.
                pipe = Pipeline(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1)
                with pipe:
                    enc = fn.external_source(source=lambda: [np.frombuffer(current[0], np.uint8)], batch=True,
                                             device="cpu", dtype=types.UINT8, ndim=1)
                    pipe.set_outputs(fn.decoders.image(enc, device=decode_device, output_type=types.RGB))
                pipe.build()
            current[0] = data
            try:
                pipe.run()
                reasons.append(None)
            except RuntimeError as e:
                reasons.append(f"DALI cannot decode it ({len(data)} bytes): {_dali_reason(e)}")
                pipe = None
        return reasons

    def _to_torch(self, out) -> torch.Tensor:
        """A dense DALI TensorList (CPU or GPU) copied into a new torch tensor on self.device.

        DALI's output buffers are only valid until the next `run` (docs: data_types, TensorList), so the
        data is copied - on the GPU asynchronously on torch's current stream, and `__iter__` waits for that
        copy (an event) before it runs the pipeline again.
        """
        t = out.as_tensor()
        dtype = torch.float16 if self.policy.dtype == "bfloat16" else torch.float32
        arr = torch.empty(t.shape(), dtype=dtype, device=self.device)
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            feed_ndarray(t, arr, cuda_stream=stream)
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        else:
            feed_ndarray(t, arr)
        # DALI has no bfloat16: it writes float16 (exact for normalized pixels to 3 significant digits,
        # more than bf16 keeps) and the cast runs here, on the device.
        return arr.to(torch.bfloat16) if self.policy.dtype == "bfloat16" else arr

    def __iter__(self) -> Iterator[PairBatch]:
        epoch, total = self.epoch, self.source.steps_per_epoch()
        if self.step >= total:
            return
        self._raws = iter(self.source.batches(epoch, self.step))
        self._replay.clear()
        self._inflight.clear()
        self._feed_error = None
        pipe = self._build()
        try:
            while True:
                if self._copied is not None:  # the last outputs' copy must be done before DALI reuses them
                    self._copied.synchronize()
                    self._copied = None
                try:
                    outs = pipe.run()
                except StopIteration:
                    break
                except RuntimeError as err:  # a decode failure the cheap check missed
                    if self._feed_error is not None or "decoders.image" not in str(err):
                        raise
                    pipe = None  # a pipeline that failed is dead
                    self._recover(err)
                    pipe = self._build()
                    continue
                fed = self._inflight.popleft()
                yield self._emit(fed, outs, epoch)
        finally:
            pipe = None  # frees the pipeline's (GPU) buffers at the end of an epoch or an abandoned iteration
            self._raws = None
            self._replay.clear()
            self._inflight.clear()
        if self.step != total:
            raise RuntimeError(f"PairSource ended epoch {epoch} at step {self.step} of {total}")

    def _emit(self, fed: _Fed, outs, epoch: int) -> PairBatch:
        raw = fed.raw
        if raw.step != self.step or raw.epoch != epoch:
            raise RuntimeError(f"loader expected epoch {epoch} step {self.step} but got epoch {raw.epoch} "
                               f"step {raw.step}: the PairSource must yield the epoch's steps in order")
        if fed.error is not None and self.on_corrupt == "error":
            raise CorruptImage(fed.error)
        self.corrupt_skipped += fed.corrupt
        valid = torch.from_numpy(fed.valid.copy()).to(self.device)
        views = [self._to_torch(o) for o in outs]
        if not bool(fed.valid.all()):
            for v in views:
                v[~valid] = 0
        self.step += 1  # before yielding: state_dict() taken with this batch in hand points past it
        return PairBatch(view1=views[0], view2=views[1],
                         patient=torch.tensor(np.asarray(raw.patient, dtype=np.int64), device=self.device),
                         valid=valid, keys=list(raw.keys), epoch=epoch, step=raw.step)
