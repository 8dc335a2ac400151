"""The contrastive model: backbone features and projected embeddings from one forward pass."""

from __future__ import annotations

import torch
from torch import nn


class ContrastiveModel(nn.Module):
    """backbone (B, 3, H, W) -> features (B, F); head (B, F) -> embeddings (B, D).

    Only the backbone is kept after pretraining; `encoder_state_dict()` is what fine-tuning loads.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (features (B, F), embeddings (B, D)); embeddings are not normalized."""
        features = self.backbone(x)
        return features, self.head(features)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's state_dict as plain float32, contiguous CPU tensors (integer buffers such as
        num_batches_tracked keep their dtype), whatever the training precision or memory format was.
        Under ZeRO-3 the parameters are partitioned: gather them first (DeepSpeed's GatheredParameters)."""
        out = {}
        for k, v in self.backbone.state_dict().items():
            v = v.detach().to("cpu")
            out[k] = (v.float() if v.is_floating_point() else v).contiguous().clone()
        return out
