"""The DDP baseline worker of bench/train.py: the trainer's per-step work in a plain torch DDP loop.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port PORT bench/ddp_loop.py \
        --config configs/debug_cpu.yaml run_dir=DIR data.shards=SHARDS train.steps=40 ...

Same config (load_config), same loader (make_pair_loader), same model and optimizer (build_model,
build_optimizer; global BN as the trainer builds it), same loss (nt_xent) and lr schedule (lr_at), the
model wrapped in torch.nn.parallel.DistributedDataParallel over gloo. Per step, as the trainer's ContrastiveStep
at grad_accum 1: agree on padding (the BN mask) -> cat views -> forward -> nt_xent -> backward (DDP
all-reduces gradients) -> optimizer step. (grad_accum > 1 here is plain per-micro-batch accumulation.) Rank 0 appends
{"step", "loss", "lr", "pairs_per_s"} per step to RUN_DIR/metrics.jsonl, timed like the trainer's StepTimer.
No checkpoints, no metrics display: this is the floor the DeepSpeed trainer is compared against.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from medssl_scale.augment.policy import policy_from_config
    from medssl_scale.config import load_config
    from medssl_scale.data.loader import make_pair_loader
    from medssl_scale.distributed.env import resolve
    from medssl_scale.distributed.batchnorm import set_batch_mask
    from medssl_scale.distributed.sync import any_rank
    from medssl_scale.losses.ntxent import nt_xent
    from medssl_scale.optim import lr_at
    from medssl_scale.train.builders import build_model, build_optimizer, peak_lr
    from medssl_scale.train.plan import batch_plan

    cfg = load_config(a.config, a.overrides)
    env = resolve()
    plan = batch_plan(cfg, env.world_size)
    dist.init_process_group("gloo")
    device = torch.device("cpu")
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    loader = make_pair_loader(cfg.data.shards, cfg.data.split, plan.micro_batch, policy_from_config(cfg.augment),
                              mode=cfg.data.mode, backend=cfg.data.backend, dist=env, seed=cfg.seed,
                              workers=cfg.data.workers, on_corrupt=cfg.data.on_corrupt, cuda=False)
    loader.load_state_dict({"epoch": 0, "step": 0})
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device.type).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    model = DDP(model)
    total = cfg.train.steps
    peak, o = peak_lr(cfg), cfg.optim

    def micro_batches():
        while True:
            yield from loader
            loader.set_epoch(loader.state_dict()["epoch"] + 1, 0)

    batches = micro_batches()
    out_path = run_dir / "metrics.jsonl"
    records = []
    t0 = time.perf_counter()
    for step in range(total):
        lr = lr_at(step, peak, o.warmup_steps, total, o.final_lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses = []
        for k in range(plan.grad_accum):
            batch = next(batches)
            x = torch.cat([batch.view1, batch.view2]).to(device)
            if cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = model.no_sync() if k < plan.grad_accum - 1 else _null()
            padded = any_rank(not bool(batch.valid.all()), device)
            set_batch_mask(model.module, torch.cat([batch.valid, batch.valid]) if padded else None)
            with sync:
                _, emb = model(x)
                z1, z2 = emb.float().chunk(2)
                out = nt_xent(z1, z2, cfg.loss.temperature, patient=batch.patient, valid=batch.valid,
                              exclude_same_patient=cfg.loss.exclude_same_patient, chunk_size=cfg.loss.chunk_size)
                (out.loss / plan.grad_accum).backward()
            losses.append(float(out.global_loss))
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = sum(losses) / len(losses)
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step + 1}")
        now = time.perf_counter()
        dt, t0 = now - t0, now
        records.append({"step": step + 1, "loss": loss, "lr": lr, "pairs_per_s": plan.global_batch / dt})
        if env.is_main:
            with open(out_path, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
