"""(parameters, MACs) of archs, counted once per arch from pieces counted once per space: the cost features of predictors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from nas.supernets.blocks import type_of
from nas.supernets.costs import count_macs, example_input
from nas.supernets.elastic import count_parameters
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.supernet import EntryProjection, build_head, build_stem, spatial_after, stage_contexts


class ArchCosts:
    """Exact parameter and MAC counts (equal to ``nas.supernets.costs.arch_cost``) of archs of ``space``, cached per
    arch and summed from ``PieceCosts`` (a new arch costs dictionary look-ups once its pieces are counted).
    ``ArchCosts.for_space(space)`` shares one cache per space within the process, so predictors of the same space never
    count an arch twice.
    """

    _shared: ClassVar[dict[SearchSpace, ArchCosts]] = {}

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._costs: dict[Arch, tuple[int, int]] = {}
        self._pieces = PieceCosts.for_space(space)

    @classmethod
    def for_space(cls, space: SearchSpace) -> ArchCosts:
        """The process-wide cache of ``space``'s arch costs."""
        shared = cls._shared.get(space)
        if shared is None:
            shared = cls._shared[space] = cls(space)
        return shared

    def __len__(self) -> int:
        return len(self._costs)

    def cost(self, arch: Arch) -> tuple[int, int]:
        """``(parameters, MACs)`` of ``arch`` for a batch of one."""
        cached = self._costs.get(arch)
        if cached is None:
            cached = self._costs[arch] = self._pieces.cost(arch)
        return cached

    def matrix(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]`` float64: column 0 the MACs, column 1 the parameters of each arch."""
        rows = [self.cost(arch) for arch in archs]
        return np.asarray([[float(macs), float(params)] for params, macs in rows], dtype=np.float64).reshape(len(rows), 2)


class PieceCosts:
    """Exact ``(parameters, MACs)`` of archs of ``space`` (batch of one), as the sum of the arch's pieces.

    A piece is the stem (per input size), an entry projection (per input and output width, stride and input size), a
    block config in its context (widths, stride) at its input size, or the head (per width and input size); each is
    built and counted once (``count_parameters``, ``count_macs``) the first time an arch needs it, so a new arch costs
    dictionary look-ups. ``matrix`` gives the layout of ``ArchCosts.matrix`` (column 0 MACs, column 1 parameters) and
    the same numbers. ``PieceCosts.for_space(space)`` shares one cache per space within the process. The global torch
    random state is left as it was.
    """

    _shared: ClassVar[dict[SearchSpace, PieceCosts]] = {}

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._pieces: dict[tuple[Any, ...], tuple[int, int]] = {}

    @classmethod
    def for_space(cls, space: SearchSpace) -> PieceCosts:
        """The process-wide piece cache of ``space``."""
        shared = cls._shared.get(space)
        if shared is None:
            shared = cls._shared[space] = cls(space)
        return shared

    def __len__(self) -> int:
        """Pieces counted so far."""
        return len(self._pieces)

    def cost(self, arch: Arch) -> tuple[int, int]:
        """``(parameters, MACs)`` of ``arch`` (already checked to be in the space)."""
        space = self.space
        image = space.modality == "image"
        size = arch.resolution if image else arch.sequence_length
        if size is None:
            raise ValueError(f"PieceCosts: the arch has no {'resolution' if image else 'sequence_length'}")
        pieces = self._pieces
        parameters, macs = pieces.get(("stem", size)) or self._count(("stem", size), lambda: build_stem(space), lambda: example_input(space, size))
        current = spatial_after(size, space.stem.stride) if image else size
        width = space.stem.channels
        for index, (stage, stage_arch) in enumerate(zip(space.stages, arch.stages, strict=True)):
            after = spatial_after(current, stage.stride) if image else current
            first_size = current
            if stage.entry_projection:
                key: tuple[Any, ...] = ("projection", index, width, stage_arch.width, current)
                counted = pieces.get(key) or self._projection(key, stage.stride, width, stage_arch.width, current)
                parameters, macs = parameters + counted[0], macs + counted[1]
                first_size = after
            for position, config in enumerate(stage_arch.blocks):
                block_size = first_size if position == 0 else after
                key = ("block", index, position == 0, width, stage_arch.width, block_size, config)
                counted = pieces.get(key) or self._block(key, index, position == 0, width, stage_arch.width, block_size, config)
                parameters, macs = parameters + counted[0], macs + counted[1]
            width = stage_arch.width
            current = after
        key = ("head", width, current)
        counted = pieces.get(key) or self._count(key, lambda: build_head(space, width), lambda: self._activations(width, current))
        return parameters + counted[0], macs + counted[1]

    def matrix(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]`` float64: column 0 the MACs, column 1 the parameters of each arch."""
        matrix = np.empty((len(archs), 2), dtype=np.float64)
        for row, arch in enumerate(archs):
            parameters, macs = self.cost(arch)
            matrix[row, 0] = macs
            matrix[row, 1] = parameters
        return matrix

    def _projection(self, key: tuple[Any, ...], stride: int, in_channels: int, out_channels: int, size: int) -> tuple[int, int]:
        modality = self.space.modality
        return self._count(key, lambda: EntryProjection(modality, in_channels, out_channels, stride), lambda: self._activations(in_channels, size))

    def _block(self, key: tuple[Any, ...], stage: int, first: bool, in_channels: int, out_channels: int, size: int, config: Any) -> tuple[int, int]:
        first_context, rest_context = stage_contexts(self.space, self.space.stages[stage], in_channels, out_channels)
        context = first_context if first else rest_context
        return self._count(key, lambda: type_of(config).static_class(config, context), lambda: self._activations(context.in_channels, size))

    def _activations(self, channels: int, size: int) -> torch.Tensor:
        if self.space.modality == "image":
            return torch.zeros(1, channels, size, size)
        return torch.zeros(1, size, channels)

    def _count(self, key: tuple[Any, ...], build: Callable[[], torch.nn.Module], example: Callable[[], torch.Tensor]) -> tuple[int, int]:
        with torch.random.fork_rng(devices=[]):
            module = build()
            counted = (count_parameters(module), count_macs(module, example()))
        self._pieces[key] = counted
        return counted


__all__ = ["ArchCosts", "PieceCosts"]
