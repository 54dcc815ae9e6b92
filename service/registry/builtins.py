"""Built-in, pure-torch architectures with BatchNorm. Small on purpose: the demo and the tests use them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class TinyConvNet(nn.Module):
    """conv+BN backbone and a linear head: the shape of the recipe's frozen-backbone fine-tune."""

    def __init__(self, in_channels: int = 3, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1, bias=False),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(width * 2, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x).flatten(1))


class MLPBN(nn.Module):
    """Stacked Linear+BatchNorm1d blocks and a head: the benchmark's shape, at any size."""

    def __init__(self, dim: int = 32, depth: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU()) for _ in range(depth)]
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.blocks(x))


def tiny_convnet(**kwargs: int) -> nn.Module:
    """Two conv+BatchNorm2d blocks and a linear head (3x8x8 input, 10 classes)."""
    return TinyConvNet(**kwargs)


def mlp_bn(**kwargs: int) -> nn.Module:
    """Three Linear+BatchNorm1d blocks of width 32 and a linear head (10 classes)."""
    return MLPBN(**kwargs)


# name -> (factory, default kwargs)
BUILTINS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "tiny-convnet": (tiny_convnet, {}),
    "mlp-bn": (mlp_bn, {}),
}
