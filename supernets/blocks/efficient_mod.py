"""EfficientMod's block: an image MetaFormer block whose token mixer is efficient modulation.

Ma et al., *Efficient Modulation for Vision Networks*, ICLR 2024. For x: [B, C, H, W] and the modulation width
``D = hidden_channels(C, expand_ratio)``, the token mixer computes

* context: ``context_in`` (``1x1`` conv C -> D), ``context_conv`` (depthwise ``k x k`` on D, ``context_kernel_size``),
  GELU, ``context_out`` (``1x1`` conv D -> D);
* value: ``value`` (``1x1`` conv C -> D);
* ``output`` (``1x1`` conv D -> C) of ``context * value``;

all with bias (the paper's linear layers, here as ``1x1`` convolutions on the image layout). Block (see
``image_metaformer.py``): ``x + mixer(BN(x))``, then ``x + ffn(BN(x))`` with the shared feed-forward network on the
tokens. (The paper fuses the MLP into the modulation, with a GELU on the value branch and a context of a quarter of
the width repeated four times; here the modulation is the token mixer and the MLP is the shared FFN, so that every
MetaFormer block has one FFN family.)

Elastic: ``context_kernel_size`` (centred window through Once-for-All's kernel transforms), ``expand_ratio``
(leading modulation channels: the context's inner channels and the modulated channels, each reordered by importance)
plus the shared FFN fields (``ffn``, ``mlp_ratio``, ``activation``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticConv2d, importance_order
from ..layers import hidden_channels
from .base import BlockChoices, BlockContext, FloatRule, IntRule, choice, register_block
from .image_metaformer import ElasticImageMetaFormerBlock, ElasticImageMixer, ImageMetaFormerBlock
from .metaformer import activation_field, ffn_field, mlp_ratio_field


@dataclass(frozen=True, slots=True)
class EfficientModConfig:
    """Efficient modulation token mixer, then a feed-forward network."""

    context_kernel_size: int = choice(IntRule(3, 11, odd=True), "depthwise kernel of the context branch", shrinks="kernel")
    expand_ratio: float = choice(FloatRule(0.5, 8), "modulation width as a multiple of the block width", shrinks="width")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


class EfficientModulation(nn.Module):
    """Static efficient modulation (see the module docstring). x: [B, C, H, W] -> same shape."""

    def __init__(self, config: EfficientModConfig, context: BlockContext) -> None:
        super().__init__()
        channels = context.in_channels
        width = hidden_channels(channels, config.expand_ratio)
        kernel_size = config.context_kernel_size
        self.context_in = nn.Conv2d(channels, width, 1)
        self.context_conv = nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.context_out = nn.Conv2d(width, width, 1)
        self.value = nn.Conv2d(channels, width, 1)
        self.output = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context_out(F.gelu(self.context_conv(self.context_in(x))))
        return self.output(context * self.value(x))


class ElasticEfficientModulation(ElasticImageMixer):
    """Efficient modulation with elastic width, context kernel and modulation width (leading channels)."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        width = hidden_channels(channels, max(choices["expand_ratio"]))
        self.context_in = ElasticConv2d(channels, width, bias=True)
        self.context_conv = ElasticConv2d(width, width, choices["context_kernel_size"], depthwise=True, bias=True, kernel_transform=True)
        self.context_out = ElasticConv2d(width, width, bias=True)
        self.value = ElasticConv2d(channels, width, bias=True)
        self.output = ElasticConv2d(width, channels, bias=True)

    def forward(self, x: torch.Tensor, config: EfficientModConfig, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> same shape."""
        width = hidden_channels(channels, config.expand_ratio)
        context = self.context_conv(self.context_in(x, channels, width, 1), width, width, config.context_kernel_size)
        context = self.context_out(F.gelu(context), width, width, 1)
        return self.output(context * self.value(x, channels, width, 1), width, channels, 1)

    def reorder_channels(self) -> None:
        """Sort the modulated channels by the L1 norm of the output conv's weights on them (the context's and the
        value's output channels move with them), and the context's inner channels by the L1 norm of
        ``context_out``'s weights on them (``context_in``'s outputs and the depthwise filters move with them)."""
        modulated = importance_order(self.output.weight, 1)
        self.context_out.permute_(out_order=modulated)
        self.value.permute_(out_order=modulated)
        self.output.permute_(in_order=modulated)
        inner = importance_order(self.context_out.weight, 1)
        self.context_in.permute_(out_order=inner)
        self.context_conv.permute_(out_order=inner)
        self.context_out.permute_(in_order=inner)

    def export_layers(self, config: EfficientModConfig, channels: int) -> dict[str, nn.Module]:
        width = hidden_channels(channels, config.expand_ratio)
        return {
            "context_in": self.context_in.export(channels, width, 1),
            "context_conv": self.context_conv.export(width, width, config.context_kernel_size),
            "context_out": self.context_out.export(width, width, 1),
            "value": self.value.export(channels, width, 1),
            "output": self.output.export(width, channels, 1),
        }


class EfficientModBlock(ImageMetaFormerBlock):
    """Static EfficientMod block (see ``EfficientModulation``). x: [B, C, H, W] -> same shape."""

    token_mixer_class = EfficientModulation
    block_name = "efficient_mod"


@register_block("efficient_mod", config=EfficientModConfig, static=EfficientModBlock, modalities=("image",), reshapes=False)
class ElasticEfficientModBlock(ElasticImageMetaFormerBlock):
    """Elastic EfficientMod block: context_kernel_size, expand_ratio, ffn kind, mlp_ratio and activation are
    elastic."""

    token_mixer_class = ElasticEfficientModulation


__all__ = ["EfficientModBlock", "EfficientModConfig", "EfficientModulation", "ElasticEfficientModBlock", "ElasticEfficientModulation"]
