"""Benchmark the DeepSpeed trainer's throughput against a plain torch DDP loop; prints one JSON line.

    .venv/bin/python bench/train.py [--steps 40] [--warmup 5] [--rounds 1] [--keep DIR]

What is compared, on 2 CPU processes each (OMP_NUM_THREADS=1 per process, DS_ACCELERATOR=cpu, gloo),
run one after the other in this one invocation:
  deepspeed  the real trainer: `deepspeed --num_gpus 2 --master_port P launch/pretrain.py
             --config configs/debug_cpu.yaml ...` (Trainer: DeepSpeed engine forward/backward/step, the
             per-step preemption check, metrics.jsonl; one checkpoint at the end, after the last timed step)
  ddp        bench/ddp_loop.py under `torchrun --nproc_per_node 2 --master_port P`: the same config,
             loader (make_pair_loader), model/optimizer (build_model/build_optimizer, global BN), loss
             (nt_xent) and lr (lr_at), the model in torch DistributedDataParallel
Both use configs/debug_cpu.yaml with the test suite's FAST overrides (tests/trainrun.py: 32 px, head
64->32, global batch 16 = 2 x 8 pairs, data.workers=0, log every step), train.steps=--steps and
checkpoint_every past the run, on shards of data/sample_cxr built into a temp dir (--max-side 64, as
tests/trainrun.build_sample_shards).

Measure: each run's per-step pairs/s from its run_dir/metrics.jsonl (the trainer's own; ddp_loop.py writes
the same on rank 0, timed the same way: wall time between consecutive optimizer steps). The first --warmup
steps are dropped; the median of the rest is reported per side (over all rounds; with --rounds N the two
sides alternate which goes first). ratio_vs_ddp = deepspeed / ddp; goal: >= 0.9.
max_loss_diff: the largest per-step |loss difference| between the two sides of a round, a check that both
did the same work (same seed, data order and weights; 0.0 observed on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
GOAL = 0.9
sys.path.insert(0, str(REPO / "tests"))  # the test suite's launcher helpers: one definition of the run

from trainrun import FAST, build_sample_shards as build_shards, free_port  # noqa: E402

GLOBAL_BATCH = next(int(o.split("=")[1]) for o in FAST if o.startswith("train.global_batch="))


def launch(side: str, run_dir: Path, shards: Path, steps: int) -> float:
    args = ["--config", "configs/debug_cpu.yaml", f"run_dir={run_dir}", f"data.shards={shards}", *FAST,
            f"train.steps={steps}", f"train.checkpoint_every={10**9}"]
    if side == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "launch/pretrain.py", *args]
    else:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               "bench/ddp_loop.py", *args]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench/train.py: {side} run exited {proc.returncode}")
    return time.perf_counter() - t


def read_metrics(run_dir: Path, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise SystemExit(f"bench/train.py: {run_dir}/metrics.jsonl does not hold steps 1..{steps}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out")
    p.add_argument("--rounds", type=int, default=1, help="runs per side, alternating which goes first")
    p.add_argument("--keep", help="work in this directory (kept) instead of a temp dir")
    a = p.parse_args()
    if a.warmup >= a.steps:
        raise SystemExit("--warmup must be below --steps")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = build_shards(work / "shards")
        rates = {"deepspeed": [], "ddp": []}
        walls = {"deepspeed": [], "ddp": []}
        loss_diff = 0.0
        for r in range(a.rounds):
            order = ("deepspeed", "ddp") if r % 2 == 0 else ("ddp", "deepspeed")
            rows = {}
            for side in order:
                run_dir = work / f"{side}-{r}"
                walls[side].append(round(launch(side, run_dir, shards, a.steps), 1))
                rows[side] = read_metrics(run_dir, a.steps)
                rates[side] += [row["pairs_per_s"] for row in rows[side][a.warmup:]]
            pairs = zip(rows["deepspeed"], rows["ddp"])
            loss_diff = max(loss_diff, *(abs(x["loss"] - y["loss"]) for x, y in pairs))
    ds, ddp = statistics.median(rates["deepspeed"]), statistics.median(rates["ddp"])
    ratio = ds / ddp
    print(json.dumps({
        "deepspeed_pairs_per_s": round(ds, 2), "ddp_pairs_per_s": round(ddp, 2), "ratio_vs_ddp": round(ratio, 3),
        "steps": a.steps, "warmup_steps_skipped": a.warmup, "rounds": a.rounds, "global_batch": GLOBAL_BATCH,
        "processes": 2, "omp_num_threads": 1, "goal": f"ratio_vs_ddp >= {GOAL}", "goal_met": ratio >= GOAL,
        "max_loss_diff": loss_diff,
        "run_wall_s": walls, "bench_wall_s": round(time.perf_counter() - t0, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
