"""Supernet assembly: stem, stages of elastic blocks, head; activation by ``Arch``; extraction of static subnets."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockContext, ElasticBlock, type_of
from .elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLayerNorm, ElasticLinear
from .layers import make_activation
from .space import Arch, SearchSpace, StageSpace


class ImageStem(nn.Module):
    """x: [B, C_in, H, W] -> [B, channels, H / stride, W / stride]: conv + BN + activation."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.activation = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class SequenceStem(nn.Module):
    """tokens: [B, L] int64 -> [B, L, channels]: token embedding + learned position embedding, then (for
    ``kernel_size > 1``) a residual causal depthwise convolution over the last ``kernel_size`` tokens, the "short
    convolution" of H3 / Based / Mamba that hands each token its predecessors (what associative recall needs)."""

    def __init__(self, vocab_size: int, channels: int, max_length: int, kernel_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, channels)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(max_length, channels) * 0.02)
        self.kernel_size = kernel_size
        self.short_conv = nn.Conv1d(channels, channels, kernel_size, groups=channels) if kernel_size > 1 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) + self.position[: tokens.shape[1]]
        if self.short_conv is None:
            return x
        shifted = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))
        return x + self.short_conv(shifted).transpose(1, 2)


class EntryProjection(nn.Module):
    """Stage entry for width-preserving blocks. image: 3x3 conv (stride) + BN; sequence: linear."""

    def __init__(self, modality: str, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.modality = modality
        if modality == "image":
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
            self.norm = nn.BatchNorm2d(out_channels)
        else:
            self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "image":
            return self.norm(self.conv(x))
        return self.linear(x)


class ImageHead(nn.Module):
    """x: [B, C, H, W] -> logits [B, num_classes]: 1x1 conv + BN + act per width, pool, [linear + act], dropout, linear."""

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        features: int | None,
        dropout: float,
        activation: str,
        num_classes: int,
        features_bias: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for out in channels:
            layers += [nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out), make_activation(activation)]
            width = out
        self.convs = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(width, features, bias=features_bias), make_activation(activation)) if features else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features or width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x).mean(dim=(2, 3))
        return self.classifier(self.dropout(self.features(x)))


class SequenceHead(nn.Module):
    """x: [B, L, C] -> logits [B, L, num_classes]: LayerNorm + per-token linear."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x))


class StaticNet(nn.Module):
    """A static subnet: ``head(stages(stem(x)))``. image x: [B, C, R, R] -> [B, classes];
    sequence tokens: [B, L] -> [B, L, classes]."""

    def __init__(self, stem: nn.Module, stages: list[nn.Sequential], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def stage_contexts(space: SearchSpace, stage: StageSpace, in_channels: int, out_channels: int) -> tuple[BlockContext, BlockContext]:
    """Contexts of the first and of the following blocks of ``stage`` for the given widths."""
    if stage.entry_projection:
        inner = BlockContext(space.modality, out_channels, out_channels, 1, space.causal)
        return inner, inner
    first = BlockContext(space.modality, in_channels, out_channels, stage.stride, space.causal)
    return first, dataclasses.replace(first, in_channels=out_channels, stride=1)


def build_stem(space: SearchSpace) -> ImageStem | SequenceStem:
    if space.modality == "image":
        stem = space.stem
        return ImageStem(space.in_channels, stem.channels, stem.kernel_size, stem.stride, stem.activation)
    return SequenceStem(space.in_channels, space.stem.channels, max(space.sequence_lengths), space.stem.kernel_size)


def build_head(space: SearchSpace, in_channels: int) -> ImageHead | SequenceHead:
    if space.modality == "image":
        head = space.head
        return ImageHead(in_channels, head.channels, head.features, head.dropout, head.activation, space.num_classes, head.features_bias)
    return SequenceHead(in_channels, space.num_classes)


def build_static(space: SearchSpace, arch: Arch) -> StaticNet:
    """A freshly initialised static network of ``arch`` (used for counting; ``Supernet.extract`` copies weights)."""
    space.check(arch)
    width = space.stem.channels
    stages = []
    for stage, stage_arch in zip(space.stages, arch.stages, strict=True):
        first, rest = stage_contexts(space, stage, width, stage_arch.width)
        modules: list[nn.Module] = []
        if stage.entry_projection:
            modules.append(EntryProjection(space.modality, width, stage_arch.width, stage.stride))
        for position, config in enumerate(stage_arch.blocks):
            entry = type_of(config)
            modules.append(entry.static_class(config, first if position == 0 else rest))
        stages.append(nn.Sequential(*modules))
        width = stage_arch.width
    return StaticNet(build_stem(space), stages, build_head(space, width))


class ElasticStage(nn.Module):
    """One stage: an optional entry projection and, per position, one elastic block per allowed type."""

    def __init__(self, space: SearchSpace, stage: StageSpace, max_in_channels: int) -> None:
        super().__init__()
        self.space = space
        self.stage = stage
        max_width = max(stage.widths)
        self.projection_conv: ElasticConv2d | None = None
        self.projection_norm: ElasticBatchNorm2d | None = None
        self.projection_linear: ElasticLinear | None = None
        if stage.entry_projection and space.modality == "image":
            self.projection_conv = ElasticConv2d(max_in_channels, max_width, (3,), stage.stride)
            self.projection_norm = ElasticBatchNorm2d(max_width)
        elif stage.entry_projection:
            self.projection_linear = ElasticLinear(max_in_channels, max_width)
        first, rest = stage_contexts(space, stage, max_in_channels, max_width)
        self.positions = nn.ModuleList(
            nn.ModuleDict({choices.type: choices.entry.elastic_class(first if position == 0 else rest, choices) for choices in stage.blocks})
            for position in range(max(stage.depths))
        )
        self.in_channels = max_in_channels
        self.width = max_width
        self.active: list[ElasticBlock] = []

    def set_active(self, in_channels: int, width: int, configs: tuple) -> None:
        first, rest = stage_contexts(self.space, self.stage, in_channels, width)
        active = []
        for position, config in enumerate(configs):
            candidates = cast(nn.ModuleDict, self.positions[position])
            block = cast(ElasticBlock, candidates[type_of(config).name])
            context = first if position == 0 else rest
            block.set_active(config, context.in_channels, context.out_channels)
            active.append(block)
        self.in_channels, self.width, self.active = in_channels, width, active

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection_conv is not None:
            assert self.projection_norm is not None, "the image entry projection is built as conv + norm"
            x = self.projection_norm(self.projection_conv(x, self.in_channels, self.width, 3), self.width)
        elif self.projection_linear is not None:
            x = self.projection_linear(x, self.in_channels, self.width)
        for block in self.active:
            x = block(x)
        return x

    def extract(self) -> nn.Sequential:
        modules: list[nn.Module] = []
        if self.stage.entry_projection:
            projection = EntryProjection(self.space.modality, self.in_channels, self.width, self.stage.stride)
            if self.projection_conv is not None:
                assert self.projection_norm is not None, "the image entry projection is built as conv + norm"
                projection.conv = self.projection_conv.export(self.in_channels, self.width, 3)
                projection.norm = self.projection_norm.export(self.width)
            else:
                assert self.projection_linear is not None, "a sequence stage with entry_projection has a linear projection"
                projection.linear = self.projection_linear.export(self.in_channels, self.width)
            modules.append(projection)
        modules += [block.extract() for block in self.active]
        return nn.Sequential(*modules)


class Supernet(nn.Module):
    """Weight-sharing network over a ``SearchSpace``. The largest arch is active after construction.

    image x: [B, C, R, R] (R = the active resolution; see ``resize_input``) -> logits [B, classes];
    sequence tokens: [B, L] -> logits [B, L, classes].
    """

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        stem = space.stem
        if space.modality == "image":
            self.stem_conv = ElasticConv2d(space.in_channels, stem.channels, (stem.kernel_size,), stem.stride)
            self.stem_norm = ElasticBatchNorm2d(stem.channels)
            self.stem_activation = make_activation(stem.activation)
        else:
            self.sequence_stem = build_stem(space)
        stages = []
        width = stem.channels
        for stage in space.stages:
            stages.append(ElasticStage(space, stage, width))
            width = max(stage.widths)
        self.stages = nn.ModuleList(stages)
        self.head_convs = nn.ModuleList()
        self.head_norms = nn.ModuleList()
        head = space.head
        if space.modality == "image":
            for out in head.channels:
                self.head_convs.append(ElasticConv2d(width, out, (1,)))
                self.head_norms.append(ElasticBatchNorm2d(out))
                width = out
            self.head_activation = make_activation(head.activation)
            self.head_features = ElasticLinear(width, head.features, bias=head.features_bias) if head.features else None
            self.dropout = nn.Dropout(head.dropout)
            self.classifier = ElasticLinear(head.features or width, space.num_classes)
        else:
            self.head_norm = ElasticLayerNorm(width)
            self.classifier = ElasticLinear(width, space.num_classes)
        self.arch: Arch = space.largest()
        self.set_active(self.arch)

    def set_active(self, arch: Arch) -> None:
        """Activate ``arch``; raises ``ArchError`` if it is not in the space (never clamps)."""
        self.space.check(arch)
        width = self.space.stem.channels
        for stage, stage_arch in zip(self.stages, arch.stages, strict=True):
            cast(ElasticStage, stage).set_active(width, stage_arch.width, stage_arch.blocks)
            width = stage_arch.width
        self.last_width = width
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.space.stem.channels
        if self.space.modality == "image":
            x = self.stem_activation(self.stem_norm(self.stem_conv(x, self.space.in_channels, channels, self.space.stem.kernel_size), channels))
        else:
            x = self.sequence_stem(x)
        for stage in self.stages:
            x = stage(x)
        width = self.last_width
        if self.space.modality == "sequence":
            return self.classifier(self.head_norm(x, width), width, self.space.num_classes)
        for conv, norm, out in zip(self.head_convs, self.head_norms, self.space.head.channels, strict=True):
            x = self.head_activation(norm(conv(x, width, out, 1), out))
            width = out
        x = x.mean(dim=(2, 3))
        features = self.space.head.features
        if self.head_features is not None and features is not None:
            x = self.head_activation(self.head_features(x, width, features))
            width = features
        return self.classifier(self.dropout(x), width, self.space.num_classes)

    def extract(self, arch: Arch | None = None) -> StaticNet:
        """The static subnet of ``arch`` (default: the active one), sharing no storage with the supernet."""
        if arch is not None:
            self.set_active(arch)
        space = self.space
        stem = build_stem(space) if space.modality == "image" else copy.deepcopy(self.sequence_stem)
        if isinstance(stem, ImageStem):
            stem.conv = self.stem_conv.export(space.in_channels, space.stem.channels, space.stem.kernel_size)
            stem.norm = self.stem_norm.export(space.stem.channels)
        head = build_head(space, self.last_width)
        if isinstance(head, ImageHead):
            width = self.last_width
            for index, (conv, norm, out) in enumerate(zip(self.head_convs, self.head_norms, space.head.channels, strict=True)):
                head.convs[3 * index] = cast(ElasticConv2d, conv).export(width, out, 1)
                head.convs[3 * index + 1] = cast(ElasticBatchNorm2d, norm).export(out)
                width = out
            features = space.head.features
            if self.head_features is not None and features is not None:
                cast(nn.Sequential, head.features)[0] = self.head_features.export(width, features)
                width = features
            head.classifier = self.classifier.export(width, space.num_classes)
        else:
            head.norm = self.head_norm.export(self.last_width)
            head.classifier = self.classifier.export(self.last_width, space.num_classes)
        static = StaticNet(stem, [cast(ElasticStage, stage).extract() for stage in self.stages], head)
        return static.train(self.training)

    @torch.no_grad()
    def reorder_channels(self) -> None:
        """Reorder every block's inner channels by importance (``ElasticBlock.reorder_channels``); the largest
        arch's function is unchanged."""
        for module in self.modules():
            if isinstance(module, ElasticBlock):
                module.reorder_channels()

    def batch_norms(self) -> list[ElasticBatchNorm2d]:
        return [module for module in self.modules() if isinstance(module, ElasticBatchNorm2d)]


def resize_input(x: torch.Tensor, arch: Arch) -> torch.Tensor:
    """Images x: [B, C, H, W] resized (bilinear) to the arch's resolution; sequences returned unchanged."""
    if arch.resolution is None or x.shape[-1] == arch.resolution and x.shape[-2] == arch.resolution:
        return x
    return F.interpolate(x, size=(arch.resolution, arch.resolution), mode="bilinear", align_corners=False)


def spatial_after(size: int, stride: int) -> int:
    """Output size of a 'same'-padded odd-kernel conv with ``stride``."""
    return math.ceil(size / stride)
