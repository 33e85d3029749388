"""InceptionNeXt's block: an image MetaFormer block whose token mixer is the Inception depthwise convolution.

Yu et al., *InceptionNeXt: When Inception Meets ConvNeXt*, 2023. The token mixer splits the channels of
x: [B, C, H, W] into four groups, with ``g = branch_channels(C, conv_ratio)`` channels in each convolution branch:

* channels ``[0, g)``: depthwise ``k x k`` convolution (``kernel_size``, with bias);
* channels ``[g, 2g)``: depthwise ``1 x b`` horizontal band convolution (``band_kernel_size``, with bias);
* channels ``[2g, 3g)``: depthwise ``b x 1`` vertical band convolution (``band_kernel_size``, with bias);
* channels ``[3g, C)``: identity;

and concatenates them back in that order. The paper puts the identity group first; here the convolution branches
take the leading channels, so that a smaller ``conv_ratio`` keeps a leading slice of each branch's filters.

Block (see ``image_metaformer.py``): ``x + mixer(BN(x))``, then ``x + ffn(BN(x))`` with the shared feed-forward
network on the tokens. (The paper's MetaNeXt block has one residual, ``x + mlp(BN(mixer(x)))``; the two-residual
MetaFormer form is kept here so that all image mixers share one skeleton.)

Elastic: ``kernel_size`` (centred window through Once-for-All's kernel transforms), ``band_kernel_size`` (centred
band), ``conv_ratio`` (leading filters of each branch; the identity group takes the rest) plus the shared FFN
fields (``ffn``, ``mlp_ratio``: leading hidden units, reordered by importance; ``activation``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..elastic import ElasticConv2d
from .base import BlockChoices, BlockContext, FloatRule, IntRule, choice, register_block
from .image_metaformer import ElasticImageMetaFormerBlock, ElasticImageMixer, ImageMetaFormerBlock
from .metaformer import activation_field, ffn_field, mlp_ratio_field


@dataclass(frozen=True, slots=True)
class InceptionNeXtConfig:
    """Inception depthwise convolution token mixer, then a feed-forward network."""

    kernel_size: int = choice(IntRule(3, 11, odd=True), "square depthwise kernel of the first branch", shrinks="kernel")
    band_kernel_size: int = choice(IntRule(3, 21, odd=True), "length of the 1 x b and b x 1 band kernels", shrinks="kernel")
    conv_ratio: float = choice(FloatRule(0, 1), "fraction of the channels sent to the three convolution branches (0: identity mixer)", shrinks="width")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def branch_channels(channels: int, conv_ratio: float) -> int:
    """Channels of each convolution branch: ``round(channels * conv_ratio / 3)``, at most ``channels // 3``.

    The paper's ``branch_ratio`` (0.125 by default) is ``conv_ratio / 3``.
    """
    return min(channels // 3, int(round(channels * conv_ratio / 3)))


def inception_mix(x: torch.Tensor, channels: int, branch: int, convolutions: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Split x: [B, channels, H, W] into three leading ``branch``-channel groups and the rest, apply the three
    ``convolutions`` (each ``[B, branch, H, W]`` -> same shape) to the groups and concatenate (-> [B, channels, H, W])."""
    groups = [convolution(x[:, index * branch : (index + 1) * branch]) for index, convolution in enumerate(convolutions)]
    if 3 * branch < channels:
        groups.append(x[:, 3 * branch :])
    return torch.cat(groups, dim=1)


class InceptionDepthwiseConv(nn.Module):
    """Static Inception depthwise convolution (see the module docstring). x: [B, C, H, W] -> same shape.

    Submodules ``square``, ``horizontal``, ``vertical`` (all ``None`` when ``conv_ratio`` leaves them no channel).
    """

    def __init__(self, config: InceptionNeXtConfig, context: BlockContext) -> None:
        super().__init__()
        self.channels = context.in_channels
        self.branch = branch = branch_channels(context.in_channels, config.conv_ratio)
        self.square: nn.Conv2d | None = None
        self.horizontal: nn.Conv2d | None = None
        self.vertical: nn.Conv2d | None = None
        if branch:
            square, band = config.kernel_size, config.band_kernel_size
            self.square = nn.Conv2d(branch, branch, square, padding=square // 2, groups=branch)
            self.horizontal = nn.Conv2d(branch, branch, (1, band), padding=(0, band // 2), groups=branch)
            self.vertical = nn.Conv2d(branch, branch, (band, 1), padding=(band // 2, 0), groups=branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.square is None or self.horizontal is None or self.vertical is None:
            return x
        return inception_mix(x, self.channels, self.branch, (self.square, self.horizontal, self.vertical))


class ElasticInceptionDepthwiseConv(ElasticImageMixer):
    """Inception depthwise convolution with elastic square kernel, band length, conv_ratio and width."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        max_branch = branch_channels(context.in_channels, max(choices["conv_ratio"]))
        self.square: ElasticConv2d | None = None
        self.horizontal: ElasticConv2d | None = None
        self.vertical: ElasticConv2d | None = None
        if max_branch:
            self.square = ElasticConv2d(max_branch, max_branch, choices["kernel_size"], depthwise=True, bias=True, kernel_transform=True)
            bands = choices["band_kernel_size"]
            self.horizontal = ElasticConv2d(max_branch, max_branch, bands, depthwise=True, bias=True, band="horizontal")
            self.vertical = ElasticConv2d(max_branch, max_branch, bands, depthwise=True, bias=True, band="vertical")

    def _convolutions(self) -> tuple[ElasticConv2d, ElasticConv2d, ElasticConv2d]:
        assert self.square is not None and self.horizontal is not None and self.vertical is not None, "a non-zero conv_ratio is among the choices"
        return self.square, self.horizontal, self.vertical

    def forward(self, x: torch.Tensor, config: InceptionNeXtConfig, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> same shape."""
        branch = branch_channels(channels, config.conv_ratio)
        if not branch:
            return x
        kernels = (config.kernel_size, config.band_kernel_size, config.band_kernel_size)
        convolutions = [
            partial(convolution, in_channels=branch, out_channels=branch, kernel_size=kernel)
            for convolution, kernel in zip(self._convolutions(), kernels, strict=True)
        ]
        return inception_mix(x, channels, branch, convolutions)

    def export_layers(self, config: InceptionNeXtConfig, channels: int) -> dict[str, nn.Module]:
        branch = branch_channels(channels, config.conv_ratio)
        if not branch:
            return {}
        square, horizontal, vertical = self._convolutions()
        return {
            "square": square.export(branch, branch, config.kernel_size),
            "horizontal": horizontal.export(branch, branch, config.band_kernel_size),
            "vertical": vertical.export(branch, branch, config.band_kernel_size),
        }


class InceptionNeXtBlock(ImageMetaFormerBlock):
    """Static InceptionNeXt block (see ``InceptionDepthwiseConv``). x: [B, C, H, W] -> same shape."""

    token_mixer_class = InceptionDepthwiseConv
    block_name = "inception_next"


@register_block("inception_next", config=InceptionNeXtConfig, static=InceptionNeXtBlock, modalities=("image",), reshapes=False)
class ElasticInceptionNeXtBlock(ElasticImageMetaFormerBlock):
    """Elastic InceptionNeXt block: kernel_size, band_kernel_size, conv_ratio, ffn kind, mlp_ratio and activation
    are elastic. The mixer's channels are the block's own input channels, so only the FFN's hidden units are
    reordered by importance."""

    token_mixer_class = ElasticInceptionDepthwiseConv


__all__ = [
    "ElasticInceptionDepthwiseConv",
    "ElasticInceptionNeXtBlock",
    "InceptionDepthwiseConv",
    "InceptionNeXtBlock",
    "InceptionNeXtConfig",
    "branch_channels",
    "inception_mix",
]
