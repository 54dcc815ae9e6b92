"""Two small BatchNorm models. Factories take keyword arguments (for TOML `kwargs`) and all have defaults
(entry points are called without arguments)."""

from __future__ import annotations

import torch
from torch import nn


class BNConvNet(nn.Module):
    """A conv+BatchNorm2d backbone and a linear head."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.backbone(x).flatten(1))
        return logits


class BNMLP(nn.Module):
    """Linear+BatchNorm1d blocks and a linear head."""

    def __init__(self, dim: int = 16, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU()) for _ in range(depth)]
        )
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.blocks(x))
        return logits


def build_bn_convnet(*, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> nn.Module:
    """Example conv+BatchNorm2d classifier (3-channel input)."""
    return BNConvNet(in_channels=in_channels, width=width, num_classes=num_classes)


def build_bn_mlp(*, dim: int = 16, depth: int = 2, num_classes: int = 10) -> nn.Module:
    """Example MLP of Linear+BatchNorm1d blocks."""
    return BNMLP(dim=dim, depth=depth, num_classes=num_classes)
