"""Benchmark NT-Xent forward+backward: ours (chunked) vs a plain full-matrix version; one JSON line.

Single process on CPU, float32, D=128. At 2 x 4,096 embeddings (8,192 queries against 8,192 keys) both
run; at 2 x 65,536 (131,072 x 131,072 logits, 64 GiB as one float32 matrix) only ours runs.
Goals: time_ratio_vs_direct <= 1.0 and memory_ratio_vs_direct <= 0.5.

Timing: one fresh subprocess runs one warm-up step of each, then alternates ours/direct for --reps steps
and reports each one's median, so that load from other processes hits both alike.
Memory: each number is one cold forward+backward in its own fresh subprocess, after the inputs exist.
The peak resident set growth is VmHWM - VmRSS, where VmHWM (the kernel's resident high-water mark,
/proc/self/status) is reset to the current RSS just before the step by writing 5 to
/proc/self/clear_refs; where that reset is unavailable, resource.getrusage's ru_maxrss (the process's
lifetime peak) is used instead. Both count every page the step touches, whichever allocator got it.

    .venv/bin/python bench/loss.py [--batch 4096] [--big 65536] [--reps 5] [--chunk ROWS] [--no-big]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TAU = 0.1


def direct_nt_xent(z1, z2, tau=TAU):
    """The textbook single-process NT-Xent: the full (2B, 2B) logit matrix and cross-entropy."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / tau
    logits.fill_diagonal_(float("-inf"))
    n = z.shape[0]
    target = (torch.arange(n) + n // 2) % n
    return F.cross_entropy(logits, target)


def ours_nt_xent(z1, z2, chunk=None):
    from medssl_scale.losses import nt_xent

    return nt_xent(z1, z2, TAU, chunk_size=chunk).loss


def _inputs(batch, dim, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=g)
    z2 = z1 + 0.5 * torch.randn(batch, dim, generator=g)
    return z1.requires_grad_(), z2.requires_grad_()


def _step(fn, z1, z2):
    z1.grad = z2.grad = None
    start = time.perf_counter()
    loss = fn(z1, z2)
    loss.backward()
    return time.perf_counter() - start, float(loss)


def _rss_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def child_memory(spec):
    """One cold step in this fresh process; peak RSS growth in MiB."""
    z1, z2 = _inputs(spec["batch"], spec["dim"])
    fn = direct_nt_xent if spec["impl"] == "direct" else (lambda a, b: ours_nt_xent(a, b, spec["chunk"]))
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method, base = "VmHWM reset via /proc/self/clear_refs", _rss_kb("VmRSS")
    except OSError:
        method, base = "ru_maxrss", _rss_kb("VmRSS")
    seconds, loss = _step(fn, z1, z2)
    peak = _rss_kb("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": (peak - base) / 1024, "seconds": seconds, "loss": loss, "method": method}


def child_time(spec):
    """Warm-up, then alternate ours/direct; median seconds of each."""
    z1, z2 = _inputs(spec["batch"], spec["dim"])
    impls = {"direct": direct_nt_xent, "ours": lambda a, b: ours_nt_xent(a, b, spec["chunk"])}
    times, losses = {k: [] for k in impls}, {}
    for name, fn in impls.items():
        _, losses[name] = _step(fn, z1, z2)
    for _ in range(spec["reps"]):
        for name, fn in impls.items():
            times[name].append(_step(fn, z1, z2)[0])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"ours_s": med["ours"], "direct_s": med["direct"], "ours_all_s": times["ours"],
            "direct_all_s": times["direct"], "loss_ours": losses["ours"], "loss_direct": losses["direct"]}


def _run_child(kind, spec, timeout):
    out = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                         text=True, timeout=timeout, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"bench/loss.py: {kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096, help="pairs per step in the comparison (2x as many keys)")
    ap.add_argument("--big", type=int, default=65536, help="pairs in the ours-only run")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None, help="query rows per chunk (default: automatic)")
    ap.add_argument("--no-big", action="store_true", help="skip the 2 x 65,536 run")
    a = ap.parse_args()

    import torch

    spec = {"batch": a.batch, "dim": a.dim, "chunk": a.chunk, "reps": a.reps}
    timing = _run_child("time", spec, timeout=1800)
    mem_ours = _run_child("memory", {**spec, "impl": "ours"}, timeout=600)
    mem_direct = _run_child("memory", {**spec, "impl": "direct"}, timeout=600)
    result = {
        "bench": "ntxent_loss",
        "time_ratio_vs_direct": round(timing["ours_s"] / timing["direct_s"], 3),
        "memory_ratio_vs_direct": round(mem_ours["peak_mb"] / mem_direct["peak_mb"], 4),
        "peak_mb_65536": None,
        "batch": a.batch, "keys": 2 * a.batch, "dim": a.dim, "chunk": a.chunk or "auto",
        "ours_s": round(timing["ours_s"], 4), "direct_s": round(timing["direct_s"], 4),
        "ours_all_s": [round(t, 4) for t in timing["ours_all_s"]],
        "direct_all_s": [round(t, 4) for t in timing["direct_all_s"]],
        "ours_peak_mb": round(mem_ours["peak_mb"], 1), "direct_peak_mb": round(mem_direct["peak_mb"], 1),
        "loss_abs_diff": abs(timing["loss_ours"] - timing["loss_direct"]),
        "threads": torch.get_num_threads(), "memory_method": mem_ours["method"],
    }
    if not a.no_big:
        big = _run_child("memory", {**spec, "batch": a.big, "impl": "ours"}, timeout=1800)
        result.update({"peak_mb_65536": round(big["peak_mb"], 1), "big_batch": a.big, "big_keys": 2 * a.big,
                       "time_s_65536": round(big["seconds"], 1), "loss_65536": big["loss"]})
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps(child_memory(spec) if kind == "memory" else child_time(spec)))
    else:
        main()
