"""The image MetaFormer skeleton shared by the convolutional token mixers (PoolFormer, InceptionNeXt, EfficientMod).

``x + scale1 * token_mixer(norm1(x))`` then ``x + scale2 * ffn(norm2(x))`` on ``x: [B, C, H, W]`` (Yu et al., *MetaFormer Is Actually
What You Need for Vision*, 2022). Unlike ``metaformer.MetaFormerBlock``, the token mixer runs on the image layout
(convolutions and pooling need it) and both norms are batch norms, which fold into the neighbouring layers at
inference; the feed-forward network is the shared one of ``metaformer.py`` (``FeedForward`` /
``ElasticFeedForward``), run on the tokens ``[B, H * W, C]``.

Layer layout (shared by the elastic block and its static twin, so that state-dict keys match):

* ``norm1``, ``norm2``: BatchNorm2d over the channels;
* ``scale1``, ``scale2``: per-channel LayerScale of the two residual branches (``layers.LayerScale``), initialised to
  ``LAYER_SCALE_INIT``, as PoolFormer, InceptionNeXt, HorNet and EfficientMod do: without it, a stack of
  multiplicative mixers (gnConv's recursive gates, HSM-SSD's state products) starts far from the identity and did not
  train at all here (a two-block gnConv stage stayed at chance on digits);
* ``token_mixer``: see the mixer classes (``pool_mixer.py``, ``inception_next.py``, ``efficient_mod.py``);
* ``ffn``: ``metaformer.FeedForward``.

These blocks preserve width and resolution (registered with ``reshapes=False``); the supernet adds a stage-entry
projection when a stage changes either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..elastic import ElasticBatchNorm2d, ElasticLayerScale
from ..layers import LayerScale
from .base import BlockChoices, BlockContext, ElasticBlock, field_rules
from .metaformer import ElasticFeedForward, ElasticTokenMixer, FeedForward, apply_to_tokens, check_width_preserving, prefixed

LAYER_SCALE_INIT = 0.1
"""Initial residual-branch scale. The papers use 1e-6 (HorNet, InceptionNeXt) or 1e-5 (PoolFormer) for ImageNet runs
of hundreds of epochs; a supernet trained for tens of epochs on a small task needs its branches to matter sooner."""


def check_image_block(name: str, config: Any, context: BlockContext) -> None:
    """Raise ``ValueError`` when ``context`` is not a width-preserving image context or a field of ``config`` breaks
    its rule (``name.field must ..., got ...``)."""
    if context.modality != "image":
        raise ValueError(f"{name} supports modality 'image' only, got {context.modality!r}")
    check_width_preserving(name, context)
    for field, rule in field_rules(type(config)).items():
        problem = rule.problem(getattr(config, field))
        if problem is not None:
            raise ValueError(f"{name}.{field} {problem}")


class ImageMetaFormerBlock(nn.Module):
    """Static image MetaFormer block. x: [B, C, H, W] -> same shape.

    Subclasses set ``token_mixer_class``, constructed as ``token_mixer_class(config, context)`` and mapping
    ``[B, C, H, W]`` to the same shape.
    """

    token_mixer_class: ClassVar[type[nn.Module]]
    block_name: ClassVar[str]

    def __init__(self, config: Any, context: BlockContext) -> None:
        super().__init__()
        check_image_block(self.block_name, config, context)
        self.config = config
        channels = context.in_channels
        self.norm1 = nn.BatchNorm2d(channels)
        self.token_mixer = self.token_mixer_class(config, context)
        self.scale1 = LayerScale(channels, LAYER_SCALE_INIT)
        self.norm2 = nn.BatchNorm2d(channels)
        self.ffn = FeedForward(config, channels)
        self.scale2 = LayerScale(channels, LAYER_SCALE_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> same shape."""
        x = x + self.scale1(self.token_mixer(self.norm1(x)))
        return x + self.scale2(apply_to_tokens(self.norm2(x), "image", self.ffn))


class ElasticImageMixer(ElasticTokenMixer):
    """An elastic token mixer on images: ``forward(x: [B, channels, H, W], config, channels)`` -> same shape."""


class ElasticImageMetaFormerBlock(ElasticBlock):
    """Elastic image MetaFormer block: elastic width, token mixer and feed-forward network (``ffn``, ``mlp_ratio``,
    ``activation``).

    Subclasses set ``token_mixer_class`` (an ``ElasticImageMixer``); the static twin is the class registered with
    the subclass.
    """

    token_mixer_class: ClassVar[type[ElasticImageMixer]]

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        check_image_block(self.block_type, choices.largest(), context)
        channels = context.in_channels
        self.norm1 = ElasticBatchNorm2d(channels)
        self.token_mixer = self.token_mixer_class(context, choices)
        self.scale1 = ElasticLayerScale(channels, LAYER_SCALE_INIT)
        self.norm2 = ElasticBatchNorm2d(channels)
        self.ffn = ElasticFeedForward(channels, choices)
        self.scale2 = ElasticLayerScale(channels, LAYER_SCALE_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> same shape."""
        channels = self.in_channels
        x = x + self.scale1(self.token_mixer(self.norm1(x, channels), self.config, channels), channels)
        return x + self.scale2(apply_to_tokens(self.norm2(x, channels), "image", lambda tokens: self.ffn(tokens, self.config, channels)), channels)

    def reorder_channels(self) -> None:
        """Reorder the token mixer's hidden channels (if it has any) and the feed-forward network's hidden units by
        importance; the block's input and output channels keep their order."""
        self.token_mixer.reorder_channels()
        self.ffn.reorder_channels()

    def export_layers(self) -> Mapping[str, nn.Module]:
        """Static layers of the active choice, named as in the static block."""
        channels = self.in_channels
        return {
            "norm1": self.norm1.export(channels),
            **prefixed("token_mixer", self.token_mixer.export_layers(self.config, channels)),
            "scale1": self.scale1.export(channels),
            "norm2": self.norm2.export(channels),
            **prefixed("ffn", self.ffn.export_layers(self.config, channels)),
            "scale2": self.scale2.export(channels),
        }

    def extract(self) -> nn.Module:
        """A freshly built static block holding copies of the active weights (no shared storage)."""
        return self.build_static(self.export_layers())


__all__ = ["LAYER_SCALE_INIT", "ElasticImageMetaFormerBlock", "ElasticImageMixer", "ImageMetaFormerBlock", "check_image_block"]
