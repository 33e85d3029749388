"""FasterNet's block: a partial convolution, then a pointwise MLP, with a residual connection.

Chen et al., *Run, Don't Walk: Chasing Higher FLOPS for Faster Neural Networks*, 2023. For x: [B, C, H, W]:

* ``partial``: a dense ``k x k`` convolution (no bias) over the leading ``partial_channels(C, partial_ratio)``
  channels; the other channels pass through untouched (``partial_ratio`` 0: no convolution at all);
* ``mlp``: ``1x1`` conv C -> hidden (no bias), BatchNorm2d, activation, ``1x1`` conv hidden -> C (no bias), with
  ``hidden = hidden_channels(C, mlp_ratio)``;
* ``out = x + mlp(partial(x))``.

Elastic: ``partial_ratio`` (leading input and output channels of the partial convolution, which always acts on the
block's leading channels), ``kernel_size`` (centred window), ``mlp_ratio`` (leading hidden units, reordered by
importance) and ``activation``. The width is preserved (``reshapes=False``); the supernet adds a stage-entry
projection.

Not included: PATNet's partial attention variants (*Partial Convolution Meets Visual Attention*, 2025: PAT_ch,
PAT_sp, PAT_sf). The catalogue describes them only in words (an "enhanced Gaussian channel attention" on the
untouched channels, spatial attention in the MLP, self-attention in the last stage), too little to implement them
faithfully.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..elastic import ElasticBatchNorm2d, ElasticConv2d, importance_order
from ..layers import hidden_channels, make_activation
from .base import BlockChoices, BlockContext, ElasticBlock, FloatRule, IntRule, OptionRule, choice, register_block
from .image_metaformer import check_image_block

PCONV_ACTIVATIONS = ("relu", "gelu", "silu")


@dataclass(frozen=True, slots=True)
class PConvConfig:
    """One concrete FasterNet block choice."""

    partial_ratio: float = choice(FloatRule(0, 1), "fraction of the channels the k x k convolution sees (0: none)", shrinks="width")
    kernel_size: int = choice(IntRule(1, 9, odd=True), "kernel of the partial convolution", shrinks="kernel")
    mlp_ratio: float = choice(FloatRule(0.5, 8), "hidden width of the pointwise MLP as a multiple of the block width", shrinks="width")
    activation: str = choice(OptionRule(PCONV_ACTIVATIONS), "activation inside the pointwise MLP", shrinks="switch")


def partial_channels(channels: int, ratio: float) -> int:
    """Channels of the partial convolution: ``round(channels * ratio)`` (0 when the ratio is 0)."""
    return min(channels, int(round(channels * ratio)))


class PartialConvBlock(nn.Module):
    """Static FasterNet block (see the module docstring). x: [B, C, H, W] -> same shape.

    Submodules: ``partial`` (``None`` when ``partial_channels`` is 0) and ``mlp`` (``0``: conv, ``1``: BN,
    ``2``: activation, ``3``: conv).
    """

    def __init__(self, config: PConvConfig, context: BlockContext) -> None:
        super().__init__()
        check_image_block("pconv", config, context)
        channels = context.in_channels
        hidden = hidden_channels(channels, config.mlp_ratio)
        self.channels = channels
        self.partial_channels = partial_channels(channels, config.partial_ratio)
        kernel_size = config.kernel_size
        self.partial: nn.Conv2d | None = None
        if self.partial_channels:
            self.partial = nn.Conv2d(self.partial_channels, self.partial_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            make_activation(config.activation),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The partial convolution alone. x: [B, C, H, W] -> same shape; channels from ``partial_channels`` on are
        returned unchanged."""
        if self.partial is None:
            return x
        if self.partial_channels == self.channels:
            return self.partial(x)
        return torch.cat((self.partial(x[:, : self.partial_channels]), x[:, self.partial_channels :]), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> same shape."""
        return x + self.mlp(self.mix(x))


@register_block("pconv", config=PConvConfig, static=PartialConvBlock, modalities=("image",), reshapes=False)
class ElasticPartialConvBlock(ElasticBlock):
    """Elastic FasterNet block: partial_ratio, kernel_size, mlp_ratio, activation and the width are elastic.

    Weights are held for the largest choice: a ``partial_channels(C, max partial_ratio)``-channel convolution with
    the largest kernel and ``hidden_channels(C, max mlp_ratio)`` hidden units; smaller choices use leading slices and
    the centred kernel window.
    """

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        check_image_block(self.block_type, choices.largest(), context)
        channels = context.in_channels
        max_partial = partial_channels(channels, max(choices["partial_ratio"]))
        max_hidden = hidden_channels(channels, max(choices["mlp_ratio"]))
        self.partial = ElasticConv2d(max_partial, max_partial, choices["kernel_size"]) if max_partial else None
        self.mlp_in = ElasticConv2d(channels, max_hidden)
        self.mlp_norm = ElasticBatchNorm2d(max_hidden)
        self.activations = nn.ModuleDict({name: make_activation(name) for name in choices["activation"]})
        self.mlp_out = ElasticConv2d(max_hidden, channels)

    @property
    def partial_channels(self) -> int:
        """Channels of the active partial convolution."""
        return partial_channels(self.in_channels, self.config.partial_ratio)

    @property
    def hidden(self) -> int:
        """Hidden width of the active MLP."""
        return hidden_channels(self.in_channels, self.config.mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> same shape for the active choice."""
        channels, partial, hidden = self.in_channels, self.partial_channels, self.hidden
        mixed = x
        if partial:
            assert self.partial is not None, "a non-zero partial_ratio is among the choices, so the convolution exists"
            convolved = self.partial(x[:, :partial], partial, partial, self.config.kernel_size)
            mixed = convolved if partial == channels else torch.cat((convolved, x[:, partial:]), dim=1)
        out = self.mlp_in(mixed, channels, hidden, 1)
        out = self.activations[self.config.activation](self.mlp_norm(out, hidden))
        return x + self.mlp_out(out, hidden, channels, 1)

    def reorder_channels(self) -> None:
        """Sort the MLP's hidden units by the L1 norm of the output conv's weights on them; the first conv's outputs
        and the batch norm move with them. The partial convolution acts on the block's own input channels, whose
        order is not the block's to change."""
        order = importance_order(self.mlp_out.weight, 1)
        self.mlp_in.permute_(out_order=order)
        self.mlp_norm.permute_(order)
        self.mlp_out.permute_(in_order=order)

    def extract(self) -> PartialConvBlock:
        """A static ``PartialConvBlock`` for the active choice with cloned weights."""
        channels, partial, hidden = self.in_channels, self.partial_channels, self.hidden
        parts: dict[str, nn.Module] = {}
        if partial:
            assert self.partial is not None, "a non-zero partial_ratio is among the choices, so the convolution exists"
            parts["partial"] = self.partial.export(partial, partial, self.config.kernel_size)
        parts["mlp.0"] = self.mlp_in.export(channels, hidden, 1)
        parts["mlp.1"] = self.mlp_norm.export(hidden)
        parts["mlp.3"] = self.mlp_out.export(hidden, channels, 1)
        return cast(PartialConvBlock, self.build_static(parts))


__all__ = ["PCONV_ACTIVATIONS", "ElasticPartialConvBlock", "PConvConfig", "PartialConvBlock", "partial_channels"]
