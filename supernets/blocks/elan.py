"""The ELAN / OSA aggregation block, with optional RepVGG-style structural re-parameterisation.

One-shot aggregation (Lee et al., "An Energy and GPU-Computation Efficient Backbone Network for Real-Time Object
Detection", 2019) as used by ELAN (Wang et al., "Designing Network Design Strategies Through Gradient Path
Analysis", 2022): a chain of 3x3 convolutions whose every intermediate output is concatenated once, at the end, and
fused by a 1x1 convolution. Re-parameterisation follows RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets
Great Again", 2021).

For x: [B, C, H, W], ``n = num_convs`` and ``w = conv_width`` (static layer names in brackets):

* ``y_0 = silu(BN(conv1x1(x)))`` (``entry.0``, ``entry.1``): C -> w;
* ``y_i = silu(BN(conv3x3(y_{i-1})))`` for i = 1..n (``convs.{i-1}.0``, ``convs.{i-1}.1``): w -> w. With
  ``reparam`` the elastic block trains ``silu(BN(conv3x3(y)) + BN(conv1x1(y)) + BN(y))`` and the static block holds
  the single fused 3x3 convolution with bias (``convs.{i-1}.0``), equal in eval mode;
* ``out = x + BN(conv1x1(cat(y_0, ..., y_n)))`` (``fuse.0``, ``fuse.1``): (n + 1) * w -> C, no activation.

Elastic: ``num_convs`` (the leading convolutions of the chain), ``conv_width`` (leading channels of every piece),
``reparam`` (the extra training branches; off runs the plain 3x3 conv-BN), and the block width C (leading channels).
The fuse convolution's input is a concatenation of n + 1 pieces of w channels each, which is no leading slice of
the largest choice's (N + 1) * W inputs; the elastic block therefore holds it as N + 1 pieces (``fuse_pieces``, one
W -> C 1x1 convolution per piece, summed, which equals the convolution of the concatenation) and the static block
gets one convolution whose weight is the concatenation of the exported pieces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..elastic import ElasticBatchNorm2d, ElasticConv2d, importance_order
from .base import BlockChoices, BlockContext, BoolRule, ElasticBlock, IntRule, choice, field_rules, register_block


@dataclass(frozen=True, slots=True)
class ELANConfig:
    """One concrete ELAN / OSA module."""

    num_convs: int = choice(IntRule(1, 8), "3x3 convolutions in the aggregated chain (the leading ones are kept)", shrinks="width")
    conv_width: int = choice(IntRule(4, 512), "channels of the entry convolution and of every 3x3 convolution", shrinks="width")
    reparam: bool = choice(
        BoolRule(),
        "train each 3x3 conv with parallel 1x1 and identity branches (RepVGG), fused into one 3x3 conv when extracted",
        shrinks="switch",
    )


def _check_context(context: BlockContext, config: ELANConfig | None = None) -> None:
    """Raise ``ValueError`` unless ``context`` is a width-preserving image context and ``config`` (when given) keeps
    its fields' rules."""
    if config is not None:
        for name, rule in field_rules(ELANConfig).items():
            problem = rule.problem(getattr(config, name))
            if problem is not None:
                raise ValueError(f"elan.{name} {problem}")
    if context.modality != "image":
        raise ValueError(f"elan supports modality 'image' only, got {context.modality!r}")
    if context.in_channels != context.out_channels or context.stride != 1:
        raise ValueError(
            "elan keeps width and resolution: in_channels must equal out_channels and stride must be 1, "
            f"got in_channels={context.in_channels}, out_channels={context.out_channels}, stride={context.stride}"
        )


def fold_batch_norm(weight: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(conv(x))`` (convolution without bias) as one convolution: weight: [O, I, kh, kw] -> (weight, bias [O]),
    computed in float64."""
    assert norm.running_mean is not None and norm.running_var is not None, "batch norms here track running statistics"
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    bias = norm.bias.double() - norm.running_mean.double() * scale
    return weight.double() * scale.reshape(-1, 1, 1, 1), bias


def reparameterise(
    conv3: nn.Conv2d,
    norm3: nn.BatchNorm2d,
    conv1: nn.Conv2d,
    norm1: nn.BatchNorm2d,
    norm_identity: nn.BatchNorm2d,
) -> nn.Conv2d:
    """One 3x3 convolution with bias equal, in eval mode, to ``BN(conv3(x)) + BN(conv1(x)) + BN(x)`` (RepVGG):
    the 1x1 kernel is zero-padded to 3x3 and the identity is the 3x3 kernel with 1 at the centre of each channel's
    own filter. x: [B, w, H, W] -> [B, w, H, W]."""
    channels = conv3.out_channels
    weight3, bias3 = fold_batch_norm(conv3.weight, norm3)
    weight1, bias1 = fold_batch_norm(nn.functional.pad(conv1.weight, (1, 1, 1, 1)), norm1)
    identity = torch.zeros(channels, channels, 3, 3, dtype=torch.float64, device=conv3.weight.device)
    identity[torch.arange(channels), torch.arange(channels), 1, 1] = 1.0
    weight_identity, bias_identity = fold_batch_norm(identity, norm_identity)
    fused = nn.Conv2d(channels, channels, 3, padding=1, bias=True)
    with torch.no_grad():
        fused.weight.copy_(weight3 + weight1 + weight_identity)
        cast(torch.Tensor, fused.bias).copy_(bias3 + bias1 + bias_identity)
    return fused


def concatenate_inputs(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """One bias-free convolution over the concatenation of the inputs of ``convs`` (same output width and kernel),
    equal to the sum of their outputs."""
    weight = torch.cat([conv.weight.detach() for conv in convs], dim=1)
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], (weight.shape[2], weight.shape[3]), bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


class ELAN(nn.Module):
    """Static ELAN / OSA module (see the module docstring). x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, config: ELANConfig, context: BlockContext) -> None:
        super().__init__()
        _check_context(context, config)
        channels, width = context.in_channels, config.conv_width
        self.config = config
        self.entry = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU())
        convs: list[nn.Module] = []
        for _ in range(config.num_convs):
            if config.reparam:
                convs.append(nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=True), nn.SiLU()))
            else:
                convs.append(nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.SiLU()))
        self.convs = nn.ModuleList(convs)
        self.fuse = nn.Sequential(nn.Conv2d((config.num_convs + 1) * width, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        pieces = [self.entry(x)]
        for conv in self.convs:
            pieces.append(conv(pieces[-1]))
        return x + self.fuse(torch.cat(pieces, dim=1))


@register_block("elan", config=ELANConfig, static=ELAN, modalities=("image",), reshapes=False)
class ElasticELAN(ElasticBlock):
    """Elastic ELAN / OSA module: num_convs, conv_width, reparam and the block width are elastic.

    Weights are held for the largest choice (``max(num_convs)`` convolutions of ``max(conv_width)`` channels); the
    1x1 and identity branches exist only when ``reparam`` true is among the choices.
    """

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        _check_context(context)
        channels = context.in_channels
        max_convs = max(choices["num_convs"])
        width = max(choices["conv_width"])
        self.entry_conv = ElasticConv2d(channels, width)
        self.entry_norm = ElasticBatchNorm2d(width)
        self.conv3 = nn.ModuleList(ElasticConv2d(width, width, (3,)) for _ in range(max_convs))
        self.norm3 = nn.ModuleList(ElasticBatchNorm2d(width) for _ in range(max_convs))
        self.conv1: nn.ModuleList | None = None
        self.norm1: nn.ModuleList | None = None
        self.norm_identity: nn.ModuleList | None = None
        if True in choices["reparam"]:
            self.conv1 = nn.ModuleList(ElasticConv2d(width, width) for _ in range(max_convs))
            self.norm1 = nn.ModuleList(ElasticBatchNorm2d(width) for _ in range(max_convs))
            self.norm_identity = nn.ModuleList(ElasticBatchNorm2d(width) for _ in range(max_convs))
        self.fuse_pieces = nn.ModuleList(ElasticConv2d(width, channels) for _ in range(max_convs + 1))
        self.fuse_norm = ElasticBatchNorm2d(channels)
        self.activation = nn.SiLU()
        self._initialise(max_convs)

    def _initialise(self, max_convs: int) -> None:
        """LeCun-normal convolutions (standard deviation ``1 / sqrt(fan_in)``), with the fuse pieces counted as the
        one ``(max_convs + 1) * width``-input convolution they form, so activations keep their scale through the
        chain and the aggregation."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, ElasticConv2d):
                    fan_in = module.weight[0].numel()
                    if any(module is piece for piece in self.fuse_pieces):
                        fan_in *= max_convs + 1
                    module.weight.normal_(0.0, fan_in**-0.5)

    def _conv(self, index: int, x: torch.Tensor, width: int) -> torch.Tensor:
        """The ``index``-th 3x3 layer of the chain in its training form. x: [B, width, H, W] -> same shape."""
        out = cast(ElasticBatchNorm2d, self.norm3[index])(cast(ElasticConv2d, self.conv3[index])(x, width, width, 3), width)
        if self.config.reparam:
            assert self.conv1 is not None and self.norm1 is not None and self.norm_identity is not None, "set_active admits reparam only when it is a choice"
            out = out + cast(ElasticBatchNorm2d, self.norm1[index])(cast(ElasticConv2d, self.conv1[index])(x, width, width, 1), width)
            out = out + cast(ElasticBatchNorm2d, self.norm_identity[index])(x, width)
        return self.activation(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> same shape for the active choice."""
        channels, width = self.in_channels, self.config.conv_width
        piece = self.activation(self.entry_norm(self.entry_conv(x, channels, width, 1), width))
        fused = cast(ElasticConv2d, self.fuse_pieces[0])(piece, width, channels, 1)
        for index in range(self.config.num_convs):
            piece = self._conv(index, piece, width)
            fused = fused + cast(ElasticConv2d, self.fuse_pieces[index + 1])(piece, width, channels, 1)
        return x + self.fuse_norm(fused, channels)

    def reorder_channels(self) -> None:
        """Sort the ``conv_width`` channels by the L1 norm of the fuse convolution's weights on them, summed over the
        pieces. One order serves every piece (the entry and each 3x3 layer's outputs and inputs, their norms and the
        identity branches), so the function is unchanged at the largest choice and every smaller ``conv_width``
        keeps the most important channels of every piece."""
        order = importance_order(torch.cat([cast(ElasticConv2d, piece).weight for piece in self.fuse_pieces], dim=0), 1)
        self.entry_conv.permute_(out_order=order)
        self.entry_norm.permute_(order)
        for index in range(len(self.conv3)):
            cast(ElasticConv2d, self.conv3[index]).permute_(out_order=order, in_order=order)
            cast(ElasticBatchNorm2d, self.norm3[index]).permute_(order)
            if self.conv1 is not None and self.norm1 is not None and self.norm_identity is not None:
                cast(ElasticConv2d, self.conv1[index]).permute_(out_order=order, in_order=order)
                cast(ElasticBatchNorm2d, self.norm1[index]).permute_(order)
                cast(ElasticBatchNorm2d, self.norm_identity[index]).permute_(order)
        for piece in self.fuse_pieces:
            cast(ElasticConv2d, piece).permute_(in_order=order)

    def extract(self) -> ELAN:
        """A static ``ELAN`` for the active choice with cloned weights; with ``reparam`` each 3x3 layer is the fused
        convolution (see ``reparameterise``)."""
        config = self.config
        channels, width = self.in_channels, config.conv_width
        parts: dict[str, nn.Module] = {
            "entry.0": self.entry_conv.export(channels, width, 1),
            "entry.1": self.entry_norm.export(width),
        }
        for index in range(config.num_convs):
            conv3 = cast(ElasticConv2d, self.conv3[index]).export(width, width, 3)
            norm3 = cast(ElasticBatchNorm2d, self.norm3[index]).export(width)
            if config.reparam:
                assert self.conv1 is not None and self.norm1 is not None and self.norm_identity is not None, (
                    "set_active admits reparam only when it is a choice"
                )
                parts[f"convs.{index}.0"] = reparameterise(
                    conv3,
                    norm3,
                    cast(ElasticConv2d, self.conv1[index]).export(width, width, 1),
                    cast(ElasticBatchNorm2d, self.norm1[index]).export(width),
                    cast(ElasticBatchNorm2d, self.norm_identity[index]).export(width),
                )
            else:
                parts[f"convs.{index}.0"] = conv3
                parts[f"convs.{index}.1"] = norm3
        pieces = [cast(ElasticConv2d, self.fuse_pieces[index]).export(width, channels, 1) for index in range(config.num_convs + 1)]
        parts["fuse.0"] = concatenate_inputs(pieces)
        parts["fuse.1"] = self.fuse_norm.export(channels)
        return cast(ELAN, self.build_static(parts))


__all__ = ["ELAN", "ELANConfig", "ElasticELAN", "concatenate_inputs", "fold_batch_norm", "reparameterise"]
