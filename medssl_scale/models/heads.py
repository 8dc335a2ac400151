"""The SimCLR v2 projection head: a stack of Linear+BatchNorm layers mapping features to embeddings."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """(B, in_dim) -> (B, out_dim), with `layers` linear layers, laid out as SimCLR v2's TF code does:

        hidden layers:  Linear(no bias) -> BatchNorm1d(scale and shift) -> ReLU
        last layer:     Linear(no bias) -> BatchNorm1d(scale only)          (no ReLU)

    The Linear layers have no bias because the BN after them has its own shift. The last BN has no shift
    (TF's `center=False`): its bias exists, so the module types and state_dict keys stay standard (and
    SyncBatchNorm conversion works unchanged), but it is zero and frozen (requires_grad=False).
    With bn=False the hidden Linear layers carry a bias and the last Linear has none, as in the TF code.
    layers=2 is SimCLR v1's head, layers=3 SimCLR v2's.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, layers: int = 2, bn: bool = True):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim), ("layers", layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ProjectionHead {name} must be a positive integer, got {v!r}")
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods.append(nn.Linear(dim, hidden_dim, bias=not bn))
            if bn:
                mods.append(nn.BatchNorm1d(hidden_dim))
            mods.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim, bias=False))
        if bn:
            last_bn = nn.BatchNorm1d(out_dim)
            last_bn.bias.requires_grad_(False)
            mods.append(last_bn)
        self.net = nn.Sequential(*mods)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.net(x)
