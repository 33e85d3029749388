"""Small static layers shared by blocks: activations and rounding helpers."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hard_swish": nn.Hardswish,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for a registered name (see ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going below 90% of it (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def hidden_channels(in_channels: int, ratio: float) -> int:
    """Width of an expanded layer: ``round(in_channels * ratio)``, as torchvision and Once-for-All compute it."""
    return max(1, int(round(in_channels * ratio)))


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT's LayerScale, used by every MetaFormer image block:
    PoolFormer, ConvNeXt, InceptionNeXt, HorNet, EfficientMod). x: [B, C, H, W] -> same shape."""

    def __init__(self, channels: int, init: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1)
