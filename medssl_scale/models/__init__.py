"""Backbones, projection heads and the contrastive model that joins them."""

from medssl_scale.models.heads import ProjectionHead
from medssl_scale.models.resnet import ResNet, build_backbone
from medssl_scale.models.simclr import ContrastiveModel

__all__ = ["ContrastiveModel", "ProjectionHead", "ResNet", "build_backbone"]
