"""Representation-collapse statistics of one step's embeddings, at no extra forward.

On the (global) batch of pair embeddings z1, z2 (B, D), normalized to the unit sphere, valid rows only:
  embed_std   the standard deviation over the batch of each dimension of the normalized embeddings (both
              views pooled), averaged over dimensions: about 1/sqrt(D) for a spread representation, 0 when
              every image maps to the same point (the statistic of SimSiam, Chen and He 2021)
  align       E ||z1_i - z2_i||^2 over positive pairs (Wang and Isola 2020, alpha = 2): 0 is perfect
  uniform     log E_{i != j} exp(-2 ||z_i - z_j||^2) over all pairs of distinct embeddings of the batch
              (Wang and Isola, t = 2): lower is more uniform, 0 for a collapsed encoder
  pos_cos     mean cosine similarity of the positive pairs
  neg_cos     mean cosine similarity of z1_i with z2_j, i != j (the cross-view negatives)
"""

from __future__ import annotations

import math

import torch

COLLAPSE_KEYS = ("embed_std", "align", "uniform", "pos_cos", "neg_cos")
CHUNK = 1024


@torch.no_grad()
def collapse_stats(z1: torch.Tensor, z2: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """The statistics above, as floats, in float64; rows where `valid` is False are ignored."""
    if valid is not None:
        z1, z2 = z1[valid], z2[valid]
    n = z1.shape[0]
    if n < 2:
        return {k: math.nan for k in COLLAPSE_KEYS}
    a = torch.nn.functional.normalize(z1.double(), dim=1)
    b = torch.nn.functional.normalize(z2.double(), dim=1)
    both = torch.cat([a, b])
    std = both.std(dim=0, unbiased=False).mean()
    align = (a - b).pow(2).sum(dim=1).mean()
    pos = (a * b).sum(dim=1)
    # On the sphere ||u - v||^2 = 2 - 2 u.v: both sums come from Gram rows, CHUNK rows at a time (memory
    # CHUNK x 2B, not the (2B)^2 distance matrix of a 4096-pair batch).
    lse, neg_sum = [], torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, 2 * n, CHUNK):
        gram = both[start:start + CHUNK] @ both.T
        rows = torch.arange(start, min(start + CHUNK, 2 * n), device=a.device)
        gram[rows - start, rows] = -math.inf  # i == j is not a pair
        lse.append(torch.logsumexp(4.0 * gram - 4.0, dim=1))
    for start in range(0, n, CHUNK):
        neg_sum += (a[start:start + CHUNK] @ b.T).sum()
    uniform = torch.logsumexp(torch.cat(lse), dim=0) - math.log(2 * n * (2 * n - 1))
    neg = (neg_sum - pos.sum()) / (n * (n - 1))
    return {"embed_std": float(std), "align": float(align), "uniform": float(uniform), "pos_cos": float(pos.mean()),
            "neg_cos": float(neg)}


class SpreadWatch:
    """A warning the first time embed_std falls under `fraction` x 1/sqrt(D), and again only after it recovered.

    A collapsing encoder can still lower the contrastive loss; this is the cheapest sign of it.
    """

    def __init__(self, fraction: float, dim: int):
        self.threshold = fraction / math.sqrt(dim) if fraction > 0 else 0.0
        self.dim, self.below = dim, False

    def check(self, step: int, embed_std: float) -> str | None:
        if not self.threshold or math.isnan(embed_std):
            return None
        low = embed_std < self.threshold
        message = None
        if low and not self.below:
            message = (f"step {step}: embed_std {embed_std:.4g} is under {self.threshold:.4g} (1/sqrt({self.dim}) = "
                       f"{1 / math.sqrt(self.dim):.4g} for a spread representation): the embeddings are collapsing; "
                       f"check the learning rate, temperature and augmentations (train.collapse_warning sets this)")
        self.below = low
        return message
