"""The HorNet block: a MetaFormer block whose token mixer is the recursive gated convolution g^n Conv.

Rao et al., "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions", 2022. For
x: [B, C, H, W] and order n, the levels ``j = 0..n-1`` have widths ``w_j = level_width(C, j) = max(1, C // 2**j)``
(``w_0 = C``; a width not divisible by ``2**(n-1)`` rounds each level down, as HorNet's ``dim // 2 ** i`` does):

* ``p = proj_p(x)``: C -> w_{n-1} (the narrowest level), ``q_j = dw_j(proj_q_j(x))``: C -> w_j, depthwise k x k;
* ``p = p * q_{n-1}``, then for j = n-2 down to 0: ``p = pw_j(p) * q_j`` with ``pw_j``: w_{j+1} -> w_j (1x1);
* ``out = proj_out(p)``: C -> C. Every convolution has a bias; order 1 is the gated convolution
  ``proj_out(proj_p(x) * dw(proj_q(x)))``. HorNet's fixed ``1/3`` scale of the depthwise output is folded into the
  learned weights (it is a constant factor on ``q``).

Elastic order is sliced from the weights of the largest order N: order n uses the n widest levels (``j < n``), which
are the last n levels of HorNet's narrow-to-wide list, so the widest level always feeds ``proj_out`` and a smaller
order drops the narrowest recursion steps. The elastic mixer keeps one 1x1 convolution per level
(``proj_q.{j}``, ``depthwise.{j}``, ``pointwise.{j}``) so every level's width is a leading slice when the block width
shrinks; ``proj_p`` is sized for the widest ``p`` any order choice needs and order n uses its leading
``w_{n-1}`` rows. The static mixer has HorNet's layout, which ONNX gets: ``proj_in`` (C -> w_{n-1} + sum_j w_j,
the rows of ``proj_p`` then of ``proj_q`` from the narrowest level to the widest), one depthwise convolution over
all q channels, the ``pointwise`` convolutions (narrow to wide) and ``proj_out``; ``extract()`` concatenates the
exported per-level convolutions into it.

The block is the image MetaFormer skeleton of ``image_metaformer.py`` (``x + gnconv(norm1(x))``, then the shared
feed-forward network of ``metaformer.py``); its norms are batch norms, which fold at inference, where HorNet uses
layer norms over the channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..elastic import ElasticConv2d
from .base import BlockChoices, BlockContext, IntRule, choice, register_block
from .image_metaformer import ElasticImageMetaFormerBlock, ElasticImageMixer, ImageMetaFormerBlock
from .metaformer import activation_field, ffn_field, mlp_ratio_field


@dataclass(frozen=True, slots=True)
class GnConvConfig:
    """Recursive gated convolution token mixer, then a feed-forward network."""

    order: int = choice(IntRule(1, 5), "interaction order n: recursive gating steps (the narrowest are dropped first)", shrinks="width")
    kernel_size: int = choice(IntRule(3, 13, odd=True), "depthwise kernel size of the gates", shrinks="kernel")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def level_width(channels: int, level: int) -> int:
    """Width of recursion level ``level`` (0 is the widest, ``channels``): ``max(1, channels // 2**level)``."""
    return max(1, channels // 2**level)


class GnConv(nn.Module):
    """Static g^n Conv in HorNet's layout (see the module docstring). x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, config: GnConvConfig, context: BlockContext) -> None:
        super().__init__()
        channels = context.in_channels
        self.widths = [level_width(channels, level) for level in reversed(range(config.order))]
        gates = sum(self.widths)
        kernel_size = config.kernel_size
        self.proj_in = nn.Conv2d(channels, self.widths[0] + gates, 1)
        self.depthwise = nn.Conv2d(gates, gates, kernel_size, padding=kernel_size // 2, groups=gates)
        self.pointwise = nn.ModuleList(nn.Conv2d(narrow, wide, 1) for narrow, wide in zip(self.widths, self.widths[1:], strict=False))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        p, q = torch.split(self.proj_in(x), [self.widths[0], sum(self.widths)], dim=1)
        gates = torch.split(self.depthwise(q), self.widths, dim=1)
        p = p * gates[0]
        for pointwise, gate in zip(self.pointwise, gates[1:], strict=True):
            p = pointwise(p) * gate
        return self.proj_out(p)


def concatenate_outputs(convs: list[nn.Conv2d], depthwise: bool = False) -> nn.Conv2d:
    """One convolution whose output channels are those of ``convs`` in order (same input and square kernel, padding
    that keeps the size; a depthwise one when ``depthwise``, over the concatenated channels)."""
    weight = torch.cat([conv.weight.detach() for conv in convs], dim=0)
    bias = torch.cat([cast(torch.Tensor, conv.bias).detach() for conv in convs], dim=0)
    out_channels = weight.shape[0]
    in_channels = out_channels if depthwise else weight.shape[1]
    kernel_size = weight.shape[-1]
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=out_channels if depthwise else 1)
    with torch.no_grad():
        conv.weight.copy_(weight)
        cast(torch.Tensor, conv.bias).copy_(bias)
    return conv


class ElasticGnConv(ElasticImageMixer):
    """g^n Conv with elastic width, order and depthwise kernel (Once-for-All kernel transforms)."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        max_order = max(choices["order"])
        widths = [level_width(channels, level) for level in range(max_order)]
        self.proj_p = ElasticConv2d(channels, level_width(channels, min(choices["order"]) - 1), bias=True)
        self.proj_q = nn.ModuleList(ElasticConv2d(channels, width, bias=True) for width in widths)
        self.depthwise = nn.ModuleList(
            ElasticConv2d(width, width, choices["kernel_size"], depthwise=True, bias=True, kernel_transform=True) for width in widths
        )
        self.pointwise = nn.ModuleList(ElasticConv2d(narrow, wide, bias=True) for wide, narrow in zip(widths, widths[1:], strict=False))
        self.proj_out = ElasticConv2d(channels, channels, bias=True)

    def forward(self, x: torch.Tensor, config: GnConvConfig, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> [B, channels, H, W]."""
        widths = [level_width(channels, level) for level in range(config.order)]
        p = self.proj_p(x, channels, widths[-1], 1)
        for level in reversed(range(config.order)):
            if level < config.order - 1:
                p = cast(ElasticConv2d, self.pointwise[level])(p, widths[level + 1], widths[level], 1)
            q = cast(ElasticConv2d, self.proj_q[level])(x, channels, widths[level], 1)
            p = p * cast(ElasticConv2d, self.depthwise[level])(q, widths[level], widths[level], config.kernel_size)
        return self.proj_out(p, channels, channels, 1)

    def export_layers(self, config: GnConvConfig, channels: int) -> dict[str, nn.Module]:
        """The static layers of the active choice, in ``GnConv``'s layout."""
        order = config.order
        widths = [level_width(channels, level) for level in range(order)]
        levels = list(reversed(range(order)))
        proj_in = [self.proj_p.export(channels, widths[-1], 1)]
        proj_in += [cast(ElasticConv2d, self.proj_q[level]).export(channels, widths[level], 1) for level in levels]
        depthwise = [cast(ElasticConv2d, self.depthwise[level]).export(widths[level], widths[level], config.kernel_size) for level in levels]
        layers: dict[str, nn.Module] = {"proj_in": concatenate_outputs(proj_in), "depthwise": concatenate_outputs(depthwise, depthwise=True)}
        for index, level in enumerate(levels[1:]):
            layers[f"pointwise.{index}"] = cast(ElasticConv2d, self.pointwise[level]).export(widths[level + 1], widths[level], 1)
        layers["proj_out"] = self.proj_out.export(channels, channels, 1)
        return layers

    def reorder_channels(self) -> None:
        """Keeps the order: every inner width of g^n Conv is a level of the block width, and the leading rows of
        ``proj_p`` serve as ``p`` of a different level at each order, so no one permutation of a level keeps every
        order's function; the feed-forward network is still reordered by the block."""


class HorNetBlock(ImageMetaFormerBlock):
    """Static HorNet block (see ``GnConv``)."""

    token_mixer_class = GnConv
    block_name = "gnconv"


@register_block("gnconv", config=GnConvConfig, static=HorNetBlock, modalities=("image",), reshapes=False)
class ElasticHorNetBlock(ElasticImageMetaFormerBlock):
    """Elastic HorNet block: order, kernel_size, ffn kind, mlp_ratio, activation and the width are elastic."""

    token_mixer_class = ElasticGnConv


__all__ = [
    "ElasticGnConv",
    "ElasticHorNetBlock",
    "GnConv",
    "GnConvConfig",
    "HorNetBlock",
    "concatenate_outputs",
    "level_width",
]
