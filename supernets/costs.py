"""Exact parameter and MAC counts of archs and of whole search spaces.

MACs are counted by ``torch.utils.flop_counter`` on the static modules (convolutions and matrix products; one
MAC = two FLOPs) for a batch of one. Space-wide extremes are exact: a dynamic programme over stages whose state
is the previous stage's width, minimising (or maximising) each block position independently.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .blocks import BlockContext
from .elastic import count_parameters
from .space import Arch, SearchSpace
from .supernet import EntryProjection, build_head, build_static, build_stem, spatial_after, stage_contexts


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of ``module`` on ``example``."""
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(example)
    return counter.get_total_flops() // 2


def example_input(space: SearchSpace, size: int, batch: int = 1) -> torch.Tensor:
    """A zero input of the space's modality at ``size`` (resolution or sequence length)."""
    if space.modality == "image":
        return torch.zeros(batch, space.in_channels, size, size)
    return torch.zeros(batch, size, dtype=torch.long)


def arch_cost(space: SearchSpace, arch: Arch) -> tuple[int, int]:
    """(parameters, MACs) of ``arch``."""
    net = build_static(space, arch)
    size = arch.resolution if space.modality == "image" else arch.sequence_length
    assert size is not None, "build_static checked the arch against the space"
    return count_parameters(net), count_macs(net, example_input(space, size))


@dataclass(frozen=True, slots=True)
class SpaceCosts:
    min_params: int
    max_params: int
    min_macs: int
    max_macs: int


class _Costs:
    """Cached (params, MACs) of the pieces of a space at given widths and input sizes. With ``macs=False`` only
    parameters are counted (no forward pass; MACs read 0), which makes them independent of the input size."""

    def __init__(self, space: SearchSpace, macs: bool = True) -> None:
        self.space = space
        self.macs = macs
        self._cache: dict[tuple[tuple, int], tuple[int, int]] = {}

    def _features(self, channels: int, size: int) -> torch.Tensor:
        if self.space.modality == "image":
            return torch.zeros(1, channels, size, size)
        return torch.zeros(1, size, channels)

    def module(self, key: tuple, size: int) -> tuple[int, int]:
        """(params, MACs) of one piece (``key`` names it) at input size ``size``, counted once."""
        size = size if self.macs else 0
        if (key, size) not in self._cache:
            self._cache[(key, size)] = self._count(key, size)
        return self._cache[(key, size)]

    def _count(self, key: tuple, size: int) -> tuple[int, int]:
        kind, *args = key
        if kind == "block":
            entry_name, config, context = args
            from .blocks import block_type

            module = block_type(entry_name).static_class(config, context)
            example = self._features(context.in_channels, size)
        elif kind == "projection":
            in_channels, out_channels, stride = args
            module = EntryProjection(self.space.modality, in_channels, out_channels, stride)
            example = self._features(in_channels, size)
        elif kind == "stem":
            module = build_stem(self.space)
            example = example_input(self.space, size)
        else:
            (in_channels,) = args
            module = build_head(self.space, in_channels)
            example = self._features(in_channels, size)
        return count_parameters(module), count_macs(module, example) if self.macs else 0


def space_costs(space: SearchSpace) -> SpaceCosts:
    """Exact minimum and maximum parameters and MACs over every subnet of ``space``."""
    costs = _Costs(space)
    results = {}
    for metric in (0, 1):
        for pick in (min, max):
            results[(metric, pick)] = pick(_extreme(space, costs, size, metric, pick) for size in space.input_sizes)
    return SpaceCosts(results[(0, min)], results[(0, max)], results[(1, min)], results[(1, max)])


@functools.lru_cache(maxsize=16)
def space_minimum(space: SearchSpace, metric: Literal["params", "macs"]) -> int:
    """The exact smallest parameter count (or MAC count, batch 1) of any subnet of ``space``; equal to
    ``space_costs(space).min_params`` (``min_macs``) at a fraction of its cost (parameters need no forward pass).
    Cached per space."""
    if metric not in ("params", "macs"):
        raise ValueError(f"metric must be 'params' or 'macs', got {metric!r}")
    macs = metric == "macs"
    costs = _Costs(space, macs=macs)
    sizes = space.input_sizes if macs else space.input_sizes[:1]
    return min(_extreme(space, costs, size, int(macs), min) for size in sizes)


def _extreme(space: SearchSpace, costs: _Costs, size: int, metric: int, pick: Callable) -> int:
    stem_size = spatial_after(size, space.stem.stride) if space.modality == "image" else size
    best = {space.stem.channels: costs.module(("stem",), size)[metric]}
    current = stem_size
    for stage in space.stages:
        after = spatial_after(current, stage.stride) if space.modality == "image" else current
        options: dict[int, int] = {}
        for width in stage.widths:
            candidates = []
            for previous, total in best.items():
                first, rest = stage_contexts(space, stage, previous, width)
                entry = 0
                first_size = current
                if stage.entry_projection:
                    entry = costs.module(("projection", previous, width, stage.stride), current)[metric]
                    first_size = after
                first_cost = _position(costs, stage, first, first_size, metric, pick)
                rest_cost = _position(costs, stage, rest, after, metric, pick)
                depth_cost = pick(first_cost + (depth - 1) * rest_cost for depth in stage.depths)
                candidates.append(total + entry + depth_cost)
            options[width] = pick(candidates)
        best = options
        current = after
    return pick(total + costs.module(("head", width), current)[metric] for width, total in best.items())


def _position(costs: _Costs, stage, context: BlockContext, size: int, metric: int, pick: Callable) -> int:
    return pick(costs.module(("block", choices.type, config, context), size)[metric] for choices in stage.blocks for config in choices.configs())
