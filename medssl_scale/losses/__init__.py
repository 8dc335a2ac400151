"""Training objectives: the contrastive NT-Xent loss (SimCLR and MICLe)."""

from medssl_scale.losses.ntxent import NTXentOutput, nt_xent

__all__ = ["NTXentOutput", "nt_xent"]
