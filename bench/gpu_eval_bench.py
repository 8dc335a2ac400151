"""The evaluation job's speed on one GPU (bench/gpu_check.sh): feature extraction and fine-tuning images/s
of a ResNet-50 in bf16 through the job's own code; one JSON line per figure.

    python bench/gpu_eval_bench.py                        # on the GPU machine: 6,144 images, 224 px, batch 256
    .venv/bin/python bench/gpu_eval_bench.py --cpu --small     # dry run on the CPU: 64 images, 64 px, batch 16

Data: synthetic photograph-like JPEGs (bench/gpu_dali_bench.synthetic_jpegs: --unique distinct ones, repeated
to --images files), one image per patient, 7 classes in label column `dx`, built into labelled shards by
`python -m sharding.cli build --max-side 0` (bytes kept) and split by a `split` column (80 / 10 / 10).
The job's config is configs/ham_finetune.yaml with model.depth=50, finetune.precision=bf16 and the sizes
above; sets, encoder (random init, seed 0) and accelerator come from medssl_scale.finetune (build_sets,
load_encoder_for_eval, make_accelerator).

Figures (each line also carries model, size, batch, precision, device):
  eval_extract          images/s of features.run_over_split over the train split (shard range reads,
                        decode and resize + center crop in --workers DataLoader processes, bf16 forward under
                        Accelerate's autocast, gather by position), after a warm-up pass over the val split
  eval_extract_compute  images/s of the same backbone's forward alone on one random batch on the device
                        (no input pipeline): the ceiling eval_extract is compared against
                        (`ratio_vs_compute`); once as the job builds it (NCHW) and once channels-last
  eval_finetune         images/s of one FineTuner.train_epoch (seeded crop + flip + rotation in the workers,
                        AdamW, Accelerate backward, bf16 autocast), after a few warm-up steps
  eval_finetune_compute forward + backward + AdamW step alone on one random batch: NCHW, channels-last
No goal is set for these yet: the first GPU run gives the baseline. With --cpu the accelerator runs on the CPU
(bf16 autocast there too), so the dry run goes through every line of the GPU path but the CUDA calls.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402

from bench.gpu_dali_bench import synthetic_jpegs  # noqa: E402  (DALI is imported there only on use)

CLASSES = 7


def emit(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def build_shards(work: Path, n: int, unique: int, size: int, workers: int) -> Path:
    """n JPEG files (unique distinct images, cycled), one per patient, labels c0..c6, split 80/10/10."""
    src, out = work / "src", work / "shards"
    src.mkdir(parents=True)
    images = synthetic_jpegs(min(unique, n), size, seed=1)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"img_{i:06d}.jpg"
        (src / name).write_bytes(images[i % len(images)])
        split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
        rows.append({"path": name, "patient_id": f"p{i}", "dx": f"c{rng.integers(CLASSES)}", "split": split})
    with open(work / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cmd = [sys.executable, "-m", "sharding.cli", "build", str(src), str(out), "--manifest", str(work / "manifest.csv"),
           "--patient-col", "patient_id", "--label-cols", "dx", "--split-col", "split", "--max-side", "0",
           "--workers", str(workers), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"shard build failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}")
    return out


def workers_that_fit(workers: int, batch: int, size: int) -> tuple[int, int | None]:
    """DataLoader workers whose batches in flight (2 each, float32) fit /dev/shm with room to spare, and its
    free MiB: a small /dev/shm (a container's 64 MiB) kills loader workers with a bus error."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return workers, None
    free = st.f_bavail * st.f_frsize
    per_worker = 2 * batch * 3 * size * size * 4
    return max(1, min(workers, int(free / 1.5 / per_worker))), free // 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per call of fn after warmup calls (the device synchronized around the timed ones)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run the accelerator on the CPU (dry run)")
    ap.add_argument("--small", action="store_true", help="tiny sizes for a CPU dry run (defaults below change)")
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--images", type=int, default=None, help="files in the shards [6144; --small 64]")
    ap.add_argument("--unique", type=int, default=256, help="distinct synthetic images among them")
    ap.add_argument("--size", type=int, default=None, help="preprocess.size [224; --small 64]")
    ap.add_argument("--batch", type=int, default=None, help="data.batch_size and finetune.batch_size [256; 16]")
    ap.add_argument("--workers", type=int, default=None, help="data.workers [12; --small 2]")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps [5; --small 1]")
    ap.add_argument("--steps", type=int, default=None, help="timed compute-only steps [20; --small 2]")
    ap.add_argument("--work", default=None, help="folder for the images and shards [a new temporary one]")
    a = ap.parse_args()
    small = {"images": 64, "size": 64, "batch": 16, "workers": 2, "warmup": 1, "steps": 2}
    full = {"images": 6144, "size": 224, "batch": 256, "workers": min(12, max(1, (os.cpu_count() or 2) - 2)),
            "warmup": 5, "steps": 20}
    for k, v in (small if a.small else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if not a.cpu and not torch.cuda.is_available():
        emit(check="eval_setup", ok=False, error="no CUDA device: run with --cpu (and --small) for a dry run")
        return 1

    from accelerate import Accelerator

    from medssl_scale.finetune.classifier import Classifier
    from medssl_scale.finetune.config import load_eval_config
    from medssl_scale.finetune.encoder import load_encoder_for_eval
    from medssl_scale.finetune.features import run_over_split
    from medssl_scale.finetune.job import make_accelerator
    from medssl_scale.finetune.splits import build_sets
    from medssl_scale.finetune.train_loop import FineTuner

    asked = a.workers
    a.workers, shm_mib = workers_that_fit(a.workers, a.batch, a.size)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="medssl-eval-bench-"))
    try:
        t0 = time.perf_counter()
        shards = build_shards(work, a.images, a.unique, int(a.size * 256 / 224), a.workers)
        emit(check="eval_data", images=a.images, unique=min(a.unique, a.images), stored_px=int(a.size * 256 / 224),
             seconds=round(time.perf_counter() - t0, 2), workers=a.workers, workers_asked=asked,
             shm_free_mib=shm_mib)
        cfg = load_eval_config(str(REPO / "configs/ham_finetune.yaml"), [
            f"data.shards={shards}", f"run_dir={work / 'run'}", f"model.depth={a.depth}", "model.width=1",
            "model.small_input=false", f"preprocess.size={a.size}", f"data.batch_size={a.batch}",
            f"data.workers={a.workers}", f"finetune.batch_size={a.batch}", "finetune.precision=bf16",
            "protocol=finetune", "finetune.epochs=1", "finetune.warmup_epochs=0", "task.column=dx"])
        sets = build_sets(cfg)
        enc = load_encoder_for_eval(cfg)
        acc = Accelerator(cpu=True, mixed_precision="bf16") if a.cpu else make_accelerator(cfg)
        device = acc.device
        common = {"model": f"resnet{a.depth}x1", "size": a.size, "batch": a.batch, "precision": "bf16-autocast",
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "workers": a.workers}

        # -- feature extraction: the job's run_over_split, then the forward alone ---------------------------
        backbone = enc.backbone.to(device).eval()
        s = sets.train
        train_records = [s.records[i] for i in s.index]
        run_over_split(acc, backbone, sets.val.shardset, sets.val.records, enc.preprocess, a.batch, a.workers)
        t = time.perf_counter()
        out = run_over_split(acc, backbone, s.shardset, train_records, enc.preprocess, a.batch, a.workers)
        dt = time.perf_counter() - t
        extract = len(train_records) / dt
        x = torch.randn(a.batch, 3, a.size, a.size, device=device)
        compute = {}
        for fmt, mf in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            model = backbone if fmt == "nchw" else copy.deepcopy(backbone).to(memory_format=mf)
            xi = x.contiguous(memory_format=mf)

            @torch.no_grad()
            def forward(model=model, xi=xi):
                with acc.autocast():
                    model(xi)

            compute[fmt] = a.batch / timed(forward, a.warmup, a.steps, device)
            emit(check="eval_extract_compute", memory_format=fmt, img_per_s=round(compute[fmt], 1),
                 steps=a.steps, **common)
            del model
        present, finite = bool(out.present.all()), bool(np.isfinite(out.values).all())
        emit(check="eval_extract", ok=present and finite, images=len(train_records), seconds=round(dt, 3),
             img_per_s=round(extract, 1), ratio_vs_compute=round(extract / compute["nchw"], 3), all_present=present,
             finite=finite, feature_dim=int(out.values.shape[1]), **common)

        # -- fine-tuning: one FineTuner epoch, then the step alone -------------------------------------------
        names = sets.spec.names
        tuner = FineTuner(cfg, acc, Classifier(backbone, len(names)), sets.train, sets.val, sets.spec.task, names,
                          enc.preprocess, Path(cfg.run_dir), cfg.content_hash(), log=lambda *_: None)
        st = tuner.state
        st.step = max(0, tuner.steps_per_epoch - max(1, a.warmup))  # warm-up: the epoch's last few steps
        tuner.train_epoch()
        st.epoch, st.step, st.loss_sum, st.loss_steps = 1, 0, 0.0, 0
        t = time.perf_counter()
        tuner.train_epoch()
        dt = time.perf_counter() - t
        n_ft = tuner.steps_per_epoch * tuner.batch
        finetune = n_ft / dt
        loss = st.loss_sum / max(1, st.loss_steps)
        y = torch.randint(0, len(names), (a.batch,), device=device)
        ft_compute = {}
        for fmt, mf in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            model = copy.deepcopy(acc.unwrap_model(tuner.model)).to(memory_format=mf).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            xi = x.contiguous(memory_format=mf)

            def step(model=model, opt=opt, xi=xi):
                with acc.autocast():
                    logits = model(xi)
                acc.backward(nnf.cross_entropy(logits.float(), y))
                opt.step()
                opt.zero_grad(set_to_none=True)

            ft_compute[fmt] = a.batch / timed(step, a.warmup, a.steps, device)
            emit(check="eval_finetune_compute", memory_format=fmt, img_per_s=round(ft_compute[fmt], 1),
                 steps=a.steps, optimizer="adamw", **common)
            del model, opt
        finite = bool(np.isfinite(loss))
        emit(check="eval_finetune", ok=finite, images=n_ft, steps=tuner.steps_per_epoch, seconds=round(dt, 3),
             img_per_s=round(finetune, 1), ratio_vs_compute=round(finetune / ft_compute["nchw"], 3),
             mean_loss=round(loss, 4), finite=finite, optimizer=cfg.finetune.optimizer, **common)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
