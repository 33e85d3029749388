"""MBConv, the inverted-residual block of MobileNetV2/V3 and Once-for-All.

expand 1x1 (only when ``expand_ratio != 1``) -> depthwise ``k x k`` with the stride -> optional squeeze-and-excitation
-> project 1x1, each convolution followed by batch norm, the first two by the activation; a residual connection
when the stride is 1 and the input and output widths match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticBatchNorm2d, ElasticConv2d, importance_order
from ..layers import hidden_channels, make_activation, make_divisible
from .base import (
    BlockChoices,
    BlockContext,
    BoolRule,
    ElasticBlock,
    FloatRule,
    IntRule,
    OptionRule,
    choice,
    field_rules,
    register_block,
)


@dataclass(frozen=True, slots=True)
class MBConvConfig:
    """One concrete MBConv choice."""

    kernel_size: int = choice(IntRule(1, 11, odd=True), "depthwise kernel size", shrinks="kernel")
    expand_ratio: float = choice(FloatRule(1, 12), "hidden width / input width; 1 means no expansion conv", shrinks="width")
    activation: str = choice(OptionRule(("relu", "relu6", "hard_swish", "silu")), "activation after expansion and depthwise conv", shrinks="switch")
    squeeze_excite: bool = choice(BoolRule(), "squeeze-and-excitation after the depthwise conv", shrinks="switch")


def squeeze_channels(hidden: int) -> int:
    """Width of the squeeze-and-excitation bottleneck for ``hidden`` channels (MobileNetV3, Once-for-All)."""
    return make_divisible(hidden // 4, 8)


def _check_context(context: BlockContext) -> None:
    if context.modality != "image":
        raise ValueError(f"mbconv supports modality 'image' only, got {context.modality!r}")
    if context.stride < 1:
        raise ValueError(f"mbconv.stride must be at least 1, got {context.stride}")


class SqueezeExcitation(nn.Module):
    """Channel gate: global average pool -> 1x1 reduce -> ReLU -> 1x1 expand -> hard-sigmoid -> multiply."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1, bias=True)
        self.activation = nn.ReLU()
        self.expand = nn.Conv2d(squeezed, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, channels, H, W] -> same shape."""
        scale = self.gate(self.expand(self.activation(self.reduce(self.pool(x)))))
        return x * scale


class MBConv(nn.Module):
    """Static inverted-residual block; with ``squeeze_excite=False`` it matches torchvision's ``InvertedResidual``.

    Submodules: ``expand`` (``None`` when ``expand_ratio == 1``), ``depthwise``, ``squeeze_excite`` (``None`` when
    off) and ``project``.
    """

    def __init__(self, config: MBConvConfig, context: BlockContext) -> None:
        super().__init__()
        for name, rule in field_rules(MBConvConfig).items():
            problem = rule.problem(getattr(config, name))
            if problem is not None:
                raise ValueError(f"mbconv.{name} {problem}")
        _check_context(context)
        self.config = config
        self.context = context
        in_channels, out_channels = context.in_channels, context.out_channels
        hidden = hidden_channels(in_channels, config.expand_ratio)
        kernel_size = config.kernel_size
        self.expand: nn.Sequential | None = None
        if config.expand_ratio != 1:
            self.expand = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                make_activation(config.activation),
            )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size, context.stride, kernel_size // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            make_activation(config.activation),
        )
        self.squeeze_excite = SqueezeExcitation(hidden, squeeze_channels(hidden)) if config.squeeze_excite else None
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.use_residual = context.stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]."""
        out = x if self.expand is None else self.expand(x)
        out = self.depthwise(out)
        if self.squeeze_excite is not None:
            out = self.squeeze_excite(out)
        out = self.project(out)
        return out + x if self.use_residual else out


@register_block("mbconv", config=MBConvConfig, static=MBConv, modalities=("image",), reshapes=True)
class ElasticMBConv(ElasticBlock):
    """Elastic MBConv: kernel size (Once-for-All kernel transforms), expand ratio, activation, SE and widths.

    Weights are held for the largest choice: ``hidden_channels(context.in_channels, max expand_ratio)`` hidden
    channels, the largest kernel, SE sized for that hidden width. Smaller choices use leading channel slices.
    """

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        _check_context(context)
        expand_ratios = choices["expand_ratio"]
        self.max_hidden = hidden_channels(context.in_channels, max(expand_ratios))
        self.expand_conv: ElasticConv2d | None = None
        self.expand_norm: ElasticBatchNorm2d | None = None
        if any(ratio != 1 for ratio in expand_ratios):
            self.expand_conv = ElasticConv2d(context.in_channels, self.max_hidden)
            self.expand_norm = ElasticBatchNorm2d(self.max_hidden)
        self.depthwise_conv = ElasticConv2d(
            self.max_hidden,
            self.max_hidden,
            choices["kernel_size"],
            context.stride,
            depthwise=True,
            kernel_transform=True,
        )
        self.depthwise_norm = ElasticBatchNorm2d(self.max_hidden)
        self.se_reduce: ElasticConv2d | None = None
        self.se_expand: ElasticConv2d | None = None
        if True in choices["squeeze_excite"]:
            max_squeezed = squeeze_channels(self.max_hidden)
            self.se_reduce = ElasticConv2d(self.max_hidden, max_squeezed, bias=True)
            self.se_expand = ElasticConv2d(max_squeezed, self.max_hidden, bias=True)
        self.project_conv = ElasticConv2d(self.max_hidden, context.out_channels)
        self.project_norm = ElasticBatchNorm2d(context.out_channels)
        self.activations = nn.ModuleDict({name: make_activation(name) for name in choices["activation"]})

    @property
    def hidden(self) -> int:
        """Hidden width of the active choice."""
        return hidden_channels(self.in_channels, self.config.expand_ratio)

    @property
    def use_residual(self) -> bool:
        return self.context.stride == 1 and self.in_channels == self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride] for the active choice."""
        config = self.config
        hidden = self.hidden
        activation = self.activations[config.activation]
        out = x
        if config.expand_ratio != 1:
            assert self.expand_conv is not None and self.expand_norm is not None, "set_active admits expand_ratio != 1 only when it is among the choices"
            out = self.expand_conv(out, self.in_channels, hidden, 1)
            out = activation(self.expand_norm(out, hidden))
        out = self.depthwise_conv(out, hidden, hidden, config.kernel_size)
        out = activation(self.depthwise_norm(out, hidden))
        if config.squeeze_excite:
            assert self.se_reduce is not None and self.se_expand is not None, "set_active admits squeeze_excite only when it is among the choices"
            squeezed = squeeze_channels(hidden)
            scale = out.mean((2, 3), keepdim=True)
            scale = F.relu(self.se_reduce(scale, hidden, squeezed, 1))
            scale = F.hardsigmoid(self.se_expand(scale, squeezed, hidden, 1))
            out = out * scale
        out = self.project_conv(out, hidden, self.out_channels, 1)
        out = self.project_norm(out, self.out_channels)
        return out + x if self.use_residual else out

    def reorder_channels(self) -> None:
        """Sort the hidden channels by the L1 norm of the projection's weights on them (Once-for-All's
        ``re_organize_middle_weights``): expansion conv + BN outputs, depthwise conv + BN, SE and projection inputs
        move together. Skipped when ``expand_ratio`` 1 is a choice: that choice runs the depthwise conv on the input
        channels themselves, whose order is not the block's to change."""
        if 1 in self.choices["expand_ratio"]:
            return
        assert self.expand_conv is not None and self.expand_norm is not None, "every expand_ratio differs from 1, so the expansion exists"
        order = importance_order(self.project_conv.weight, 1)
        self.expand_conv.permute_(out_order=order)
        self.expand_norm.permute_(order)
        self.depthwise_conv.permute_(out_order=order)
        self.depthwise_norm.permute_(order)
        if self.se_reduce is not None and self.se_expand is not None:
            self.se_reduce.permute_(in_order=order)
            self.se_expand.permute_(out_order=order)
        self.project_conv.permute_(in_order=order)

    def extract(self) -> MBConv:
        """A static ``MBConv`` for the active choice with cloned weights."""
        config = self.config
        hidden = self.hidden
        parts: dict[str, nn.Module] = {}
        if config.expand_ratio != 1:
            assert self.expand_conv is not None and self.expand_norm is not None, "set_active admits expand_ratio != 1 only when it is among the choices"
            parts["expand.0"] = self.expand_conv.export(self.in_channels, hidden, 1)
            parts["expand.1"] = self.expand_norm.export(hidden)
        parts["depthwise.0"] = self.depthwise_conv.export(hidden, hidden, config.kernel_size)
        parts["depthwise.1"] = self.depthwise_norm.export(hidden)
        if config.squeeze_excite:
            assert self.se_reduce is not None and self.se_expand is not None, "set_active admits squeeze_excite only when it is among the choices"
            squeezed = squeeze_channels(hidden)
            parts["squeeze_excite.reduce"] = self.se_reduce.export(hidden, squeezed, 1)
            parts["squeeze_excite.expand"] = self.se_expand.export(squeezed, hidden, 1)
        parts["project.0"] = self.project_conv.export(hidden, self.out_channels, 1)
        parts["project.1"] = self.project_norm.export(self.out_channels)
        return cast(MBConv, self.build_static(parts))


__all__ = ["ElasticMBConv", "MBConv", "MBConvConfig", "SqueezeExcitation", "squeeze_channels"]
