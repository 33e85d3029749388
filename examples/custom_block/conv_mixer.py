"""A user's own block as a nasforge plugin: ConvMixer (Trockman & Kolter, "Patches Are All You Need?", 2022).

depthwise k x k conv -> GELU -> BN, added to the input; then pointwise 1x1 conv -> GELU -> BN. Elastic kernel size
(centred slices of the largest kernel) and width. The block keeps its width and stride (``reshapes=False``), so the
supernet puts a stage-entry projection in front of it.

Nothing in nasforge is edited: the space file names this file under ``plugins:`` and ``type: conv_mixer`` then
works in ``nas validate``, ``nas train``, ``nas run`` and ``nas export`` like a built-in block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nas.supernets.blocks import BlockChoices, BlockContext, ElasticBlock, IntRule, OptionRule, choice, register_block
from nas.supernets.elastic import ElasticBatchNorm2d, ElasticConv2d


@dataclass(frozen=True, slots=True)
class ConvMixerConfig:
    """One concrete ConvMixer choice."""

    kernel_size: int = choice(IntRule(1, 15, odd=True), "depthwise kernel size", shrinks="kernel")
    activation: str = choice(OptionRule(("gelu", "relu")), "activation after each convolution")


def _activation(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU()


class ConvMixer(nn.Module):
    """Static ConvMixer block. x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, config: ConvMixerConfig, context: BlockContext) -> None:
        super().__init__()
        channels = context.out_channels
        kernel_size = config.kernel_size
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.depthwise_norm = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)
        self.pointwise_norm = nn.BatchNorm2d(channels)
        self.activation = _activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.depthwise_norm(self.activation(self.depthwise(x)))
        return self.pointwise_norm(self.activation(self.pointwise(x)))


@register_block("conv_mixer", config=ConvMixerConfig, static=ConvMixer, modalities=("image",), reshapes=False)
class ElasticConvMixer(ElasticBlock):
    """Elastic ConvMixer: kernel size, activation and width (leading channels)."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.out_channels
        self.depthwise = ElasticConv2d(channels, channels, choices["kernel_size"], depthwise=True, bias=True)
        self.depthwise_norm = ElasticBatchNorm2d(channels)
        self.pointwise = ElasticConv2d(channels, channels, bias=True)
        self.pointwise_norm = ElasticBatchNorm2d(channels)
        self.activations = nn.ModuleDict({name: _activation(name) for name in choices["activation"]})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, out_channels, H, W] -> same shape, for the active choice."""
        channels, activation = self.out_channels, self.activations[self.config.activation]
        x = x + self.depthwise_norm(activation(self.depthwise(x, channels, channels, self.config.kernel_size)), channels)
        return self.pointwise_norm(activation(self.pointwise(x, channels, channels, 1)), channels)

    def extract(self) -> nn.Module:
        channels = self.out_channels
        return self.build_static(
            {
                "depthwise": self.depthwise.export(channels, channels, self.config.kernel_size),
                "depthwise_norm": self.depthwise_norm.export(channels),
                "pointwise": self.pointwise.export(channels, channels, 1),
                "pointwise_norm": self.pointwise_norm.export(channels),
            }
        )
