"""Training-step throughput on one GPU (bench/gpu_check.sh): ResNet-50 1x, bf16 autocast, channels-last,
DALI input, our NT-Xent and LARS; one JSON line. Goal (issue 5): >= 2,500 pairs/s on one H200.

    python bench/gpu_train_bench.py --device 0                                   # on the GPU machine
    python bench/gpu_train_bench.py --device cpu --depth 18 --size 32 --batch 8 --steps 2 --images 32   # dry run

The GPU machine has no DeepSpeed, so this is the trainer's step without the engine: the same model,
loss, optimizer and input pipeline (bench/train.py shows the engine itself costs nothing measurable).
--decode-once is the choice bench/gpu_dali_bench.py's decode_mode check made (bench/gpu_check.sh passes it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.gpu_dali_bench import ListPairSource, synthetic_jpegs  # noqa: E402
from medssl_scale.augment.dali_backend import DaliPairLoader  # noqa: E402
from medssl_scale.augment.policy import preset  # noqa: E402
from medssl_scale.losses.ntxent import nt_xent  # noqa: E402
from medssl_scale.models import ContrastiveModel, ProjectionHead, build_backbone  # noqa: E402
from medssl_scale.optim import LARS, lars_param_groups  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="0")
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256, help="pairs per step")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--decode-once", choices=("on", "off"), default="on",
                    help="DaliPairLoader(decode_once=...): the decoder inside a DALI conditional (on) or not (off)")
    a = ap.parse_args()
    cuda = a.device != "cpu"
    device = torch.device(f"cuda:{a.device}" if cuda else "cpu")
    policy = preset("simclr", size=a.size)
    source = ListPairSource(synthetic_jpegs(a.images, a.size), a.batch, a.warmup + a.steps)
    loader = DaliPairLoader(source, policy, device_id=int(a.device) if cuda else None, num_threads=a.threads,
                            decode_once=a.decode_once == "on")
    backbone = build_backbone(a.depth, 1, channels_last=True)
    model = ContrastiveModel(backbone, ProjectionHead(backbone.feature_dim, 2048, 128, layers=3)).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model, 1e-6), lr=0.3 * a.batch / 256, momentum=0.9, lr_in_velocity=True)
    loader.set_epoch(0)
    times, losses, t0 = [], [], None
    for i, batch in enumerate(loader):
        if i == a.warmup:
            t0 = time.perf_counter()  # end to end from here: input pipeline and training step together
        start = time.perf_counter()
        x = torch.cat([batch.view1, batch.view2]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, emb = model(x)
        z1, z2 = emb.float().chunk(2)
        out = nt_xent(z1, z2, 0.1, patient=batch.patient.to(device), valid=batch.valid.to(device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.global_loss))  # a host sync: the step is finished when it returns
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    loop, wall = sum(times), (time.perf_counter() - t0) if t0 else 0.0
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    pairs_per_s = round(a.batch * len(times) / wall, 1) if wall else None
    print(json.dumps({"check": "train_step", "model": f"resnet{a.depth}x1", "size": a.size, "batch": a.batch,
                      "precision": "bf16-autocast", "channels_last": True, "input": "dali",
                      "decode_once": a.decode_once == "on",
                      "device": str(device), "steps": len(times),
                      "pairs_per_s": pairs_per_s,
                      "pairs_per_s_compute": round(a.batch * len(times) / loop, 1) if loop else None,
                      "ok": finite, "finite": finite, "goal_pairs_per_s": 2500,
                      "goal_met": bool(pairs_per_s >= 2500) if cuda and pairs_per_s else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
