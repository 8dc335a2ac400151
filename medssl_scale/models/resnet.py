"""ResNet-18/34/50/101/152 with SimCLR's width multiplier, returning pooled features (no classifier)."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint
from torch import nn

from .bn_stats import frozen_running_stats

# Blocks per stage, as in He et al. 2016 (and torchvision).
_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; (B, cin, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, "ResNet v1.5" as torchvision) -> 1x1 x4; (B, cin, H, W) -> (B, 4*planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """ResNet trunk: (B, 3, H, W) -> pooled features (B, feature_dim).

    SimCLR's width multiplier scales every channel count, the stem included (unlike torchvision's
    wide_resnet, which widens only the bottleneck's inner convs). Names match torchvision's ResNet, so at
    width 1 a torchvision state_dict minus `fc.*` loads with strict=True.
    """

    def __init__(self, depth: int, width: int = 1, small_input: bool = False, zero_init_residual: bool = False):
        super().__init__()
        if depth not in _STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(_STAGES)}, got {depth!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"ResNet width multiplier must be a positive integer (SimCLR uses 1, 2, 4), got {width!r}")
        block = BasicBlock if depth < 50 else Bottleneck
        self.depth, self.width, self.small_input = depth, width, small_input
        self.inplanes = 64 * width
        if small_input:
            # 32-64 px images: a 7x7/2 stem plus maxpool would leave 1-2 px maps at layer4.
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        blocks = _STAGES[depth]
        self.layer1 = self._make_layer(block, 64 * width, blocks[0], 1)
        self.layer2 = self._make_layer(block, 128 * width, blocks[1], 2)
        self.layer3 = self._make_layer(block, 256 * width, blocks[2], 2)
        self.layer4 = self._make_layer(block, 512 * width, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * width * block.expansion
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: type, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block starts as the identity (Goyal et al. 2017); helps large-batch training.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    # Activation checkpointing: keep only each stage's input and recompute the stage in backward, trading
    # about a third more compute for the activation memory of large batches. The recomputation runs
    # BatchNorm again on the same batch (same batch statistics, so the same outputs and gradients) with its
    # running statistics frozen, so they are updated once per forward as without checkpointing.
    checkpoint_stages: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, feature_dim)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        recompute = self.checkpoint_stages and self.training and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if recompute:
                contexts = functools.partial(_recompute_contexts, stage)
                x = checkpoint(stage, x, use_reentrant=False, context_fn=contexts)
            else:
                x = stage(x)
        return torch.flatten(self.avgpool(x), 1)


def _recompute_contexts(stage: nn.Module):
    """checkpoint's (forward, recomputation) contexts: the recomputation leaves BN running stats alone."""
    return contextlib.nullcontext(), frozen_running_stats(stage)


def build_backbone(depth: int, width: int = 1, channels_last: bool = False, small_input: bool = False,
                   zero_init_residual: bool = False) -> ResNet:
    """A ResNet trunk returning (B, feature_dim) features; `.feature_dim` is 512*width (18/34) or 2048*width.

    channels_last converts the weights to NHWC, which cuDNN's tensor-core convolutions prefer; feed inputs
    in channels_last too (`x.to(memory_format=torch.channels_last)`) or each conv converts them first.
    """
    model = ResNet(depth, width, small_input=small_input, zero_init_residual=zero_init_residual)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
