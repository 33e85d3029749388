"""The MS-MLP block: a MetaFormer block whose token mixer shifts channel groups by several offsets, then mixes channels.

Zheng et al., "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs", 2022. For
x: [B, C, H, W] and an odd ``shift_size`` s, the channels are split into s balanced groups (group g holds channels
``[g * C // s, (g + 1) * C // s)``) and group g is moved by ``g - s // 2`` pixels, zero filled (``multi_scale_shift``):

* ``horizontal = shift(x, along W)``, ``vertical = shift(x, along H)`` (no weights);
* ``out = mix_horizontal(horizontal) + mix_vertical(vertical)``: two 1x1 convolutions C -> C with bias, the channel
  mixing that gathers the shifted neighbours (as MS-MLP's mixing of the shifted groups).

The shift is a zero pad of ``s // 2`` pixels and one fixed slice per group, independent of H and W, so the mixer is
resolution agnostic and exports to ONNX as Pad, Slice and Concat. Elastic: ``shift_size`` (no weights: a smaller
window moves groups by smaller offsets, like a centred kernel crop), the block width (leading channels of both
mixing convolutions), plus the shared FFN fields; the block is the image MetaFormer skeleton of
``image_metaformer.py`` (batch norms, then the shared feed-forward network of ``metaformer.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticConv2d
from .base import BlockChoices, BlockContext, IntRule, choice, register_block
from .image_metaformer import ElasticImageMetaFormerBlock, ElasticImageMixer, ImageMetaFormerBlock
from .metaformer import activation_field, ffn_field, mlp_ratio_field


@dataclass(frozen=True, slots=True)
class MSMLPConfig:
    """Multi-scale shift token mixer, then a feed-forward network."""

    shift_size: int = choice(IntRule(3, 15, odd=True), "shift window: channel groups move by -(s // 2) .. s // 2 pixels", shrinks="kernel")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def shift_groups(channels: int, shift_size: int) -> list[tuple[int, int, int]]:
    """``(first channel, end channel, offset)`` of each non-empty group of ``shift_size`` balanced groups of
    ``channels``; group g moves by ``g - shift_size // 2``."""
    radius = shift_size // 2
    bounds = [(group * channels // shift_size, (group + 1) * channels // shift_size, group - radius) for group in range(shift_size)]
    return [(start, end, offset) for start, end, offset in bounds if end > start]


def multi_scale_shift(x: torch.Tensor, channels: int, shift_size: int, dim: int) -> torch.Tensor:
    """Move each channel group of ``x`` along ``dim`` (-1: width, -2: height) by its offset (``shift_groups``),
    filling with zeros: ``out[:, c, ..., i] = x[:, c, ..., i - offset]``. x: [B, channels, H, W] -> same shape."""
    if dim not in (-1, -2):
        raise ValueError(f"dim must be -1 (width) or -2 (height), got {dim}")
    radius = shift_size // 2
    padded = F.pad(x, (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius))
    pieces = []
    for start, end, offset in shift_groups(channels, shift_size):
        first, last = radius - offset, -(radius + offset) or None
        group = padded[:, start:end]
        pieces.append(group[..., first:last] if dim == -1 else group[..., first:last, :])
    return torch.cat(pieces, dim=1)


class MultiScaleShift(nn.Module):
    """Static MS-MLP token mixer (see the module docstring). x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, config: MSMLPConfig, context: BlockContext) -> None:
        super().__init__()
        channels = context.in_channels
        self.channels = channels
        self.shift_size = config.shift_size
        self.mix_horizontal = nn.Conv2d(channels, channels, 1)
        self.mix_vertical = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        horizontal = multi_scale_shift(x, self.channels, self.shift_size, -1)
        vertical = multi_scale_shift(x, self.channels, self.shift_size, -2)
        return self.mix_horizontal(horizontal) + self.mix_vertical(vertical)


class ElasticMultiScaleShift(ElasticImageMixer):
    """MS-MLP token mixer with elastic width and shift size."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        self.mix_horizontal = ElasticConv2d(channels, channels, bias=True)
        self.mix_vertical = ElasticConv2d(channels, channels, bias=True)

    def forward(self, x: torch.Tensor, config: MSMLPConfig, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> [B, channels, H, W]."""
        horizontal = multi_scale_shift(x, channels, config.shift_size, -1)
        vertical = multi_scale_shift(x, channels, config.shift_size, -2)
        return self.mix_horizontal(horizontal, channels, channels, 1) + self.mix_vertical(vertical, channels, channels, 1)

    def export_layers(self, config: MSMLPConfig, channels: int) -> dict[str, nn.Module]:
        return {
            "mix_horizontal": self.mix_horizontal.export(channels, channels, 1),
            "mix_vertical": self.mix_vertical.export(channels, channels, 1),
        }

    def reorder_channels(self) -> None:
        """Keeps the order: the mixer's only width is the block width (its input and output channels, which belong
        to the stage) and the shift assigns offsets by channel position; the feed-forward network is still reordered
        by the block."""


class MSMLPBlock(ImageMetaFormerBlock):
    """Static MS-MLP block (see ``MultiScaleShift``)."""

    token_mixer_class = MultiScaleShift
    block_name = "ms_mlp"


@register_block("ms_mlp", config=MSMLPConfig, static=MSMLPBlock, modalities=("image",), reshapes=False)
class ElasticMSMLPBlock(ElasticImageMetaFormerBlock):
    """Elastic MS-MLP block: shift_size, ffn kind, mlp_ratio, activation and the width are elastic."""

    token_mixer_class = ElasticMultiScaleShift


__all__ = ["ElasticMSMLPBlock", "ElasticMultiScaleShift", "MSMLPBlock", "MSMLPConfig", "MultiScaleShift", "multi_scale_shift", "shift_groups"]
