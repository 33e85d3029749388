"""PoolFormer's block: an image MetaFormer block whose token mixer is average pooling minus the identity.

Yu et al., *MetaFormer Is Actually What You Need for Vision*, 2022. For x: [B, C, H, W]:

* ``norm1`` (BatchNorm2d), then the token mixer ``AvgPool(pool_size, stride 1, padding pool_size // 2,
  count_include_pad=False)(x) - x`` (parameter-free: subtracting the input cancels the identity the block's residual
  adds back), residual;
* ``norm2`` (BatchNorm2d), then the shared feed-forward network on the tokens, residual.

Elastic: ``pool_size`` (a kernel-like size, any odd value; the mixer has no weights to slice) plus the shared FFN
fields (``ffn``, ``mlp_ratio``: leading hidden units, ``activation``); see ``image_metaformer.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import BlockContext, IntRule, choice, register_block
from .image_metaformer import ElasticImageMetaFormerBlock, ElasticImageMixer, ImageMetaFormerBlock
from .metaformer import activation_field, ffn_field, mlp_ratio_field


@dataclass(frozen=True, slots=True)
class PoolMixerConfig:
    """Average-pooling token mixer, then a feed-forward network."""

    pool_size: int = choice(IntRule(3, 11, odd=True), "average-pooling window (stride 1, same padding)", shrinks="kernel")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


class PoolMixer(nn.Module):
    """Static pooling token mixer: ``avg_pool(x) - x``. x: [B, C, H, W] -> same shape.

    Padded positions are left out of each average (``count_include_pad=False``), as in PoolFormer.
    """

    def __init__(self, config: PoolMixerConfig, context: BlockContext) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(config.pool_size, stride=1, padding=config.pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ElasticPoolMixer(ElasticImageMixer):
    """Pooling token mixer with an elastic window (no weights)."""

    def forward(self, x: torch.Tensor, config: PoolMixerConfig, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> same shape."""
        size = config.pool_size
        return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False) - x

    def export_layers(self, config: PoolMixerConfig, channels: int) -> dict[str, nn.Module]:
        return {}


class PoolFormerBlock(ImageMetaFormerBlock):
    """Static PoolFormer block (see ``PoolMixer``). x: [B, C, H, W] -> same shape."""

    token_mixer_class = PoolMixer
    block_name = "pool_mixer"


@register_block("pool_mixer", config=PoolMixerConfig, static=PoolFormerBlock, modalities=("image",), reshapes=False)
class ElasticPoolFormerBlock(ElasticImageMetaFormerBlock):
    """Elastic PoolFormer block: pool_size, ffn kind, mlp_ratio and activation are elastic."""

    token_mixer_class = ElasticPoolMixer


__all__ = ["ElasticPoolFormerBlock", "ElasticPoolMixer", "PoolFormerBlock", "PoolMixer", "PoolMixerConfig"]
