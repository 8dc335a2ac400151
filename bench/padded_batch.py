"""Padding and BatchNorm on the shipped sample's real last batch of an epoch: one JSON line.

The last batch of the debug run's epoch (one process, 16 pairs, 3 valid) goes through the debug model
twice: with the batch mask (what the trainer does) and without it (padding rows in the BN statistics, as
before the fix). Each is compared with the valid pairs alone: the relative change of their embeddings
and the cosine between the parameter gradient and the clean one.

    .venv/bin/python bench/padded_batch.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from medssl_scale.augment.policy import policy_from_config  # noqa: E402
from medssl_scale.augment.torchvision_backend import TorchvisionAugmenter  # noqa: E402
from medssl_scale.config import load_config  # noqa: E402
from medssl_scale.data.reader import ShardPairSource  # noqa: E402
from medssl_scale.data.shardset import ShardSet  # noqa: E402
from medssl_scale.distributed.batchnorm import set_batch_mask  # noqa: E402
from medssl_scale.losses.ntxent import nt_xent  # noqa: E402
from medssl_scale.train.builders import build_model  # noqa: E402


def _grads(model, v1, v2, patient, valid, mask):
    model.zero_grad()
    set_batch_mask(model, mask)
    _, z = model(torch.cat([v1, v2]))
    out = nt_xent(*z.chunk(2), 0.1, patient=patient, valid=valid, exclude_same_patient=True)
    out.loss.backward()
    return z.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main() -> None:
    from trainrun import FAST, build_sample_shards

    with tempfile.TemporaryDirectory() as tmp:
        shards = build_sample_shards(Path(tmp) / "shards")
        cfg = load_config(str(REPO / "configs/debug_cpu.yaml"), [f"data.shards={shards}", *FAST])
        source = ShardPairSource(ShardSet.open(str(shards), "train"), 0, 1, cfg.train.global_batch, cfg.data.mode,
                                 cfg.seed)
        last = list(source.batches(0, source.steps_per_epoch() - 1))[0]
        batch = TorchvisionAugmenter(policy_from_config(cfg.augment))(last)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, "cpu").double()
    v1, v2 = batch["view1"].double(), batch["view2"].double()
    valid, patient = batch["valid"], batch["patient"]
    n, b = int(valid.sum()), valid.numel()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clean_z, clean_g = _grads(model, v1[valid], v2[valid], patient[valid], None, None)
    result = {"bench": "padded_batch", "valid": n, "entries": b}
    for name, mask in (("masked", torch.cat([valid, valid])), ("unmasked", None)):
        model.load_state_dict(state)
        z, g = _grads(model, v1, v2, patient, valid, mask)
        zv = torch.cat([z[:b][valid], z[b:][valid]])
        result[f"{name}_embedding_rel_change"] = float((zv - clean_z).norm() / clean_z.norm())
        result[f"{name}_grad_cosine"] = float(torch.nn.functional.cosine_similarity(g, clean_g, dim=0))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
