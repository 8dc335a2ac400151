"""Scaling model of SimCLR pretraining (ResNet-50 1x + 3-layer head, 224 px, bf16 autocast, LARS, ZeRO-0) on
H200 GPUs: pure arithmetic, a model and not a measurement. One JSON line per configuration, then markdown tables.

    python bench/scaling_model.py                     # well under a second, imports nothing but the stdlib
    python bench/scaling_model.py --nics-per-node 1   # one NIC per node instead of one per GPU
    .venv/bin/python bench/scaling_model.py --verify  # recount the model constants with torch + our model code

Counted (exact, with our model code: build_backbone(50), ProjectionHead(2048, 2048, 128, layers=3), torch's
FlopCounterMode; --verify recounts them): trainable parameters and tensors, BatchNorm layers and channels, and
the convolution + matmul FLOPs of one 224-px image, forward and forward + backward.

Everything else is an assumption, named in ASSUMPTIONS with where its value comes from. No GPU figure here
was measured by this project: the per-GPU compute rate is the bf16 datasheet peak times the fraction of peak
that NVIDIA's published ResNet-50 training result reaches on an A100, until bench/gpu_check.sh has measured
one (then pass its train_step pairs_per_s_compute with --measured-pairs-per-s).

Per step and GPU (b pairs per GPU, B = N b pairs in all, 2b images, d = 128):
  compute   2b F_train / R, plus 2b F_fwd / R when b > micro_max (contrastive accumulation: one extra
            forward per micro-batch, configs/imagenet_simclr.yaml), R = peak_bf16 x mfu
  logits    8 (2b)(2B) d / R_fp32: the chunk logits, their recomputation in backward, dQ and dK
  grad AR   all-reduce of P x 4 bytes (fp32 gradients: bf16 autocast over fp32 weights), after the backward
            (DeepSpeed ZeRO-0 reduces in its backward epilogue: no overlap with the backward)
  emb       all-gather of the keys 2B d x 4 bytes (fp32), and in backward an all-reduce of their gradient
            (distributed/gather.py sums the full gathered gradient)
  BN        SyncBatchNorm per layer and forward: all-gather of N (2C + 1) floats; per backward: all-reduce
            of 2C floats; each blocks the layer after it
  small     5 latency-bound collectives (patient ids, valid flags, loss normalizers, the padding agreement)
  optimizer LARS's per-tensor kernel launches (lars.py: ~13 per decayed tensor, 3 per excluded one)
Collective time, g = min(N, G) GPUs per node, M = ceil(N / G) nodes, k NICs per node:
  all-reduce  2(g-1)/g S / B_nvlink + 2(M-1)/M S / (k B_nic eta) + latency(N)
  all-gather   (g-1)/g S / B_nvlink +  (M-1)/M S / (k B_nic eta) + latency(N)
i.e. the ring's 2(N-1)/N S in two levels: a ring over NVLink inside each node, rings over the network across
nodes, each node's traffic spread over its k NICs (NCCL's hierarchical rings and trees give the same bandwidth
term). latency(N) = lat_intra for N <= G, else lat_intra + 2 log2(M) lat_hop.
Efficiency: pairs/s at N over N x the pairs/s of one GPU at micro_max_pairs (512) with no accumulation: for weak
scaling (512 pairs per GPU) that is the same per-GPU batch; with the global batch fixed at 4096 (strong scaling)
one GPU needs 8 accumulated micro-batches, and its efficiency below 1 is their extra forward.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# -- counted with our model code (--verify recounts) -----------------------------------------------------------
PARAMS_BACKBONE = 23_508_032       # = torchvision resnet50 without its fc layer
PARAMS_HEAD = 8_659_072            # trainable: Linear 2048x2048 + BN, Linear 2048x2048 + BN, Linear 2048x128 + BN
#                                    (8,659,200 with the last BN's bias, which is zero and frozen: no gradient)
PARAM_TENSORS = 167                # trainable tensors (168 with that bias)
DECAYED_TENSORS = 56               # 53 convolutions + 3 linear layers (LARS-adapted, weight decay)
BN_LAYERS = 56                     # 53 in the backbone, 3 in the head
BN_CHANNELS = 30_784               # sum of C over those layers
FWD_FLOPS = 8_191_574_016          # one 224-px image, convolutions + matmuls (2 FLOPs per multiply-add)
TRAIN_FLOPS = 24_338_694_144       # forward + backward (the stem's input gradient is not computed)
EMB_DIM = 128

# -- assumptions: (value, where it comes from) --------------------------------------------------------------------
ASSUMPTIONS = {
    "peak_bf16_flops": (989e12, "H100/H200 SXM datasheet, dense bf16 (H200.md); the workplace measured 788 "
                                "TFLOP/s on an 8192^3 bf16 matmul on a lent H200 (KINDS.md), not this project"),
    "mfu": (2470 * TRAIN_FLOPS / 312e12, "fraction of peak of NVIDIA's published ResNet-50 v1.5 PyTorch training, "
                                         "2,470 img/s mixed precision on 1 A100 80GB (312 TFLOP/s peak), "
                                         "DeepLearningExamples, pytorch-21.03 container: assumed to carry over"),
    "fp32_flops": (0.6 * 67e12, "60% of the 67 TFLOP/s fp32 datasheet rate for the float32 logits matmuls"),
    "nvlink_busbw": (360e9, "80% of NVLink 4's 450 GB/s per direction (900 GB/s bidirectional per GPU)"),
    "nic_efficiency": (0.9, "fraction of the NIC line rate an NCCL ring reaches on large messages"),
    "gpus_per_node": (8, "HGX H200 node"),
    "lat_intra_s": (10e-6, "small-message NCCL collective inside a node"),
    "lat_hop_s": (5e-6, "each tree level across nodes, each way"),
    "launch_s": (5e-6, "host time of one eager PyTorch kernel launch (the optimizer is launch-bound)"),
    "micro_max_pairs": (512, "largest per-GPU micro-batch assumed to fit (1,024 images of 224 px in bf16)"),
    "input": (None, "the DALI pipeline keeps up (its goal, 10,000 pairs/s per GPU, is above the compute rate)"),
}


def a(name: str) -> float:
    return ASSUMPTIONS[name][0]


def latency(n: int) -> float:
    if n <= 1:
        return 0.0
    g = int(a("gpus_per_node"))
    nodes = math.ceil(n / g)
    return a("lat_intra_s") + (2 * math.log2(nodes) * a("lat_hop_s") if nodes > 1 else 0.0)


def _levels(n: int, nic_bps: float, nics: int) -> tuple[float, float, float, float]:
    """(intra fraction, intra bandwidth, inter fraction, inter bandwidth) for one ring pass."""
    g = min(n, int(a("gpus_per_node")))
    nodes = math.ceil(n / int(a("gpus_per_node")))
    inter_bw = nics * nic_bps * a("nic_efficiency")
    return (g - 1) / g, a("nvlink_busbw"), ((nodes - 1) / nodes if nodes > 1 else 0.0), inter_bw


def all_reduce_s(size: float, n: int, nic_bps: float, nics: int) -> float:
    if n <= 1:
        return 0.0
    fi, bi, fo, bo = _levels(n, nic_bps, nics)
    return 2 * fi * size / bi + 2 * fo * size / bo + latency(n)


def all_gather_s(size: float, n: int, nic_bps: float, nics: int) -> float:
    """size: the gathered tensor's bytes (all ranks' parts together)."""
    if n <= 1:
        return 0.0
    fi, bi, fo, bo = _levels(n, nic_bps, nics)
    return fi * size / bi + fo * size / bo + latency(n)


def step(n: int, pairs_per_gpu: int, nic_gbps: float, nics: int, measured_pairs_per_s: float | None = None) -> dict:
    """Modelled seconds of one training step on n GPUs, by component."""
    b, big_b = pairs_per_gpu, n * pairs_per_gpu
    nic_bps = nic_gbps * 1e9 / 8
    accum = math.ceil(b / a("micro_max_pairs"))
    rate = a("peak_bf16_flops") * a("mfu")
    if measured_pairs_per_s:
        compute = b / measured_pairs_per_s * (1 + (FWD_FLOPS / TRAIN_FLOPS if accum > 1 else 0.0))
    else:
        compute = 2 * b * (TRAIN_FLOPS + (FWD_FLOPS if accum > 1 else 0)) / rate
    logits = 8 * (2 * b) * (2 * big_b) * EMB_DIM / a("fp32_flops")
    params = PARAMS_BACKBONE + PARAMS_HEAD
    grad = all_reduce_s(4 * params, n, nic_bps, nics)
    emb_bytes = 2 * big_b * EMB_DIM * 4
    emb = all_gather_s(emb_bytes, n, nic_bps, nics) + all_reduce_s(emb_bytes, n, nic_bps, nics)
    forwards = accum * (2 if accum > 1 else 1)
    if n > 1:
        per_fwd = sum(all_gather_s(n * (2 * c + 1) * 4, n, nic_bps, nics) for c in _bn_channels())
        per_bwd = sum(all_reduce_s(2 * c * 4, n, nic_bps, nics) for c in _bn_channels())
        bn = forwards * per_fwd + accum * per_bwd
    else:
        bn = 0.0
    small = 5 * latency(n)
    launches = DECAYED_TENSORS * 13 + (PARAM_TENSORS - DECAYED_TENSORS) * 3
    opt = 0.0 if measured_pairs_per_s else launches * a("launch_s")  # a measured step includes its optimizer
    parts = {"compute": compute, "logits": logits, "grad_allreduce": grad, "embeddings": emb, "batchnorm": bn,
             "small_collectives": small, "optimizer": opt}
    total = sum(parts.values())
    # DDP-style bound: the gradient all-reduce hidden behind the backward (2/3 of the compute)
    overlapped = total - min(grad, compute * 2 / 3)
    return {"parts_s": parts, "step_s": total, "step_s_if_overlapped": overlapped, "grad_accum": accum,
            "global_pairs": big_b}


def _bn_channels() -> list[int]:
    """C of each BatchNorm layer of ResNet-50 + head, in order (sums to BN_CHANNELS)."""
    chans = [64]
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for i in range(blocks):
            chans += [width, width, 4 * width] + ([4 * width] if i == 0 else [])
    return chans + [2048, 2048, 128]


def ntxent_cost(keys: int, n: int) -> dict:
    """Logits of one step at `keys` = 2B keys on n ranks: FLOPs (all ranks) and memory per rank."""
    queries = keys // n
    fwd = 2 * keys * keys * EMB_DIM                    # the logits matmul, every query against every key
    budget, min_rows = 2**27, 128                      # losses/ntxent.py _CHUNKING["cuda"]
    rows = queries if queries * keys <= budget else max(min_rows, budget // keys)
    return {"keys": keys, "ranks": n, "queries_per_rank": queries,
            "logits_matmul_flops_forward": fwd, "logits_flops_forward_backward": 4 * fwd,
            "full_matrix_bytes": keys * keys * 4, "per_rank_unchunked_bytes": queries * keys * 4,
            "chunk_rows": rows, "per_rank_chunk_bytes": rows * keys * 4,
            "keys_bytes": keys * EMB_DIM * 4,
            "seconds_per_rank_at_fp32_assumption": 4 * fwd / n / a("fp32_flops")}


def verify() -> int:
    """Recount the constants with torch and our model code; exit 1 on any difference."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from medssl_scale.models import ContrastiveModel, ProjectionHead, build_backbone

    backbone = build_backbone(50, 1)
    head = ProjectionHead(backbone.feature_dim, 2048, EMB_DIM, layers=3)
    model = ContrastiveModel(backbone, head)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model.eval()(torch.randn(1, 3, 224, 224))
    with FlopCounterMode(display=False) as train:
        model.train()(torch.randn(2, 3, 224, 224))[1].sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    got = {"PARAMS_BACKBONE": sum(p.numel() for p in backbone.parameters() if p.requires_grad),
           "PARAMS_HEAD": sum(p.numel() for p in head.parameters() if p.requires_grad),
           "PARAM_TENSORS": len(trainable),
           "DECAYED_TENSORS": sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
           "BN_LAYERS": len(bns), "BN_CHANNELS": sum(m.num_features for m in bns),
           "FWD_FLOPS": fwd.get_total_flops(), "TRAIN_FLOPS": train.get_total_flops() // 2}
    want = {k: globals()[k] for k in got}
    bad = {k: (want[k], got[k]) for k in got if want[k] != got[k]}
    chans_ok = [m.num_features for m in bns] == _bn_channels()
    print(json.dumps({"verify": not bad and chans_ok, "counted": got, "mismatch": bad, "bn_channels_order": chans_ok}))
    return 0 if not bad and chans_ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--nic-gbps", type=float, nargs="+", default=[200, 400])
    ap.add_argument("--nics-per-node", type=int, default=8, help="8: one NIC per GPU (rail-optimised); 1: one a node")
    ap.add_argument("--weak-pairs-per-gpu", type=int, default=512, help="weak scaling: 4096 pairs at 8 GPUs")
    ap.add_argument("--global-pairs", type=int, default=4096, help="fixed global batch")
    ap.add_argument("--measured-pairs-per-s", type=float, default=None,
                    help="a measured one-GPU step rate (gpu_train_bench's pairs_per_s_compute: forward, loss, "
                         "backward and LARS) instead of the datasheet x mfu model and the launch-count optimizer")
    ap.add_argument("--verify", action="store_true", help="recount the model constants with torch (slow)")
    args = ap.parse_args()
    if args.verify:
        return verify()

    rows = []
    for regime in ("weak", "fixed_global"):
        for nic in args.nic_gbps:
            # Both regimes against one GPU at micro_max_pairs with no accumulation: its best rate
            one = step(1, int(a("micro_max_pairs")), nic, args.nics_per_node, args.measured_pairs_per_s)
            base = one["global_pairs"] / one["step_s"]
            for n in args.gpus:
                b = args.weak_pairs_per_gpu if regime == "weak" else args.global_pairs // n
                s = step(n, b, nic, args.nics_per_node, args.measured_pairs_per_s)
                pairs_s = s["global_pairs"] / s["step_s"]
                row = {"config": "scaling", "regime": regime, "gpus": n, "nic_gbps": nic,
                       "nics_per_node": args.nics_per_node, "pairs_per_gpu": b, "global_pairs": s["global_pairs"],
                       "grad_accum": s["grad_accum"], "step_ms": round(1e3 * s["step_s"], 3),
                       "pairs_per_s": round(pairs_s, 1), "images_per_s": round(2 * pairs_s, 1),
                       "efficiency": round(pairs_s / (n * base), 4),
                       "efficiency_if_overlapped": round(s["global_pairs"] / s["step_s_if_overlapped"] / (n * base), 4),
                       "parts_ms": {k: round(1e3 * v, 3) for k, v in s["parts_s"].items()},
                       "compute_source": "measured" if args.measured_pairs_per_s else "assumed"}
                rows.append(row)
                print(json.dumps(row))
    costs = [ntxent_cost(k, n) for k in (8192, 131072) for n in (1, 8, 64, 512)]
    for c in costs:
        print(json.dumps({"config": "ntxent_logits", **c}))
    print(json.dumps({"config": "constants", "params": PARAMS_BACKBONE + PARAMS_HEAD,
                      "params_backbone": PARAMS_BACKBONE, "params_head": PARAMS_HEAD,
                      "grad_allreduce_bytes_fp32": 4 * (PARAMS_BACKBONE + PARAMS_HEAD),
                      "fwd_flops_per_image": FWD_FLOPS, "train_flops_per_image": TRAIN_FLOPS,
                      "bn_layers": BN_LAYERS, "bn_channels": BN_CHANNELS,
                      "assumptions": {k: v for k, (v, _) in ASSUMPTIONS.items()}}))
    print(markdown(rows, costs, args))
    return 0


def markdown(rows: list[dict], costs: list[dict], args) -> str:
    out = []
    for regime, title in (("weak", f"weak scaling, {args.weak_pairs_per_gpu} pairs per GPU"),
                          ("fixed_global", f"global batch fixed at {args.global_pairs} pairs")):
        sel = [r for r in rows if r["regime"] == regime]
        nics = sorted({r["nic_gbps"] for r in sel})
        head = "| GPUs | pairs/GPU | global pairs | " + " | ".join(
            f"{int(g)} Gb/s pairs/s | {int(g)} Gb/s eff." for g in nics) + " | step ms at " + \
            f"{int(nics[-1])} Gb/s: compute / grad AR / BN / emb+logits / other |"
        out += [f"\n**{title}** ({args.nics_per_node} NIC(s) per node of 8 GPUs)\n", head,
                "|" + "---|" * (3 + 2 * len(nics) + 1)]
        for n in sorted({r["gpus"] for r in sel}):
            by = {r["nic_gbps"]: r for r in sel if r["gpus"] == n}
            last = by[nics[-1]]
            p = last["parts_ms"]
            other = p["small_collectives"] + p["optimizer"]
            cells = " | ".join(f"{by[g]['pairs_per_s']:,.0f} | {by[g]['efficiency']:.2f}" for g in nics)
            out.append(f"| {n} | {last['pairs_per_gpu']} | {last['global_pairs']:,} | {cells} | "
                       f"{p['compute']:.1f} / {p['grad_allreduce']:.2f} / {p['batchnorm']:.2f} / "
                       f"{p['embeddings'] + p['logits']:.2f} / {other:.2f} |")
    out += ["\n**NT-Xent logits per step** (FLOPs over all ranks; memory per rank, fp32)\n",
            "| keys (2B) | ranks | queries/rank | fwd+bwd logits FLOPs | full matrix | per-rank block | "
            "chunk (rows) | per-rank s at fp32 assumption |", "|---|---|---|---|---|---|---|---|"]
    for c in costs:
        out.append(f"| {c['keys']:,} | {c['ranks']} | {c['queries_per_rank']:,} | "
                   f"{c['logits_flops_forward_backward'] / 1e12:.3g} TFLOP | {_bytes(c['full_matrix_bytes'])} | "
                   f"{_bytes(c['per_rank_unchunked_bytes'])} | {_bytes(c['per_rank_chunk_bytes'])} "
                   f"({c['chunk_rows']:,}) | {c['seconds_per_rank_at_fp32_assumption'] * 1e3:.3g} ms |")
    return "\n".join(out)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


if __name__ == "__main__":
    sys.exit(main())
