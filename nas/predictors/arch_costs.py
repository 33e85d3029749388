"""(parameters, MACs) of archs, counted once per arch from pieces counted once per space: the cost features of predictors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class Piece:
    """One piece of an arch: ``key`` (hashable; equal keys are the same module at the same input size), ``build()``
    a freshly initialised module, ``example()`` a zero input of batch 1 for it (images ``[1, C, H, W]``, sequences
    ``[1, L, C]``, or the network's own input for the stem)."""

    key: tuple[Any, ...]
    build: Callable[[], torch.nn.Module]
    example: Callable[[], torch.Tensor]


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
        parameters = macs = 0
        for piece in self.pieces(arch):
            counted = self.piece_cost(piece)
            parameters, macs = parameters + counted[0], macs + counted[1]
        return parameters, macs

    def piece_cost(self, piece: Piece) -> tuple[int, int]:
        """``(parameters, MACs)`` of one piece (counted once per space)."""
        return self._pieces.get(piece.key) or self._count(piece.key, piece.build, piece.example)

    def pieces(self, arch: Arch) -> list[Piece]:
        """The pieces ``arch`` is made of, in order (stem, then per stage its entry projection and blocks, then the
        head); each with the key it is counted (and, in a latency table, measured) under."""
        space = self.space
        image = space.modality == "image"
        size = arch.resolution if image else arch.sequence_length
        if size is None:
            raise ValueError(f"PieceCosts: the arch has no {'resolution' if image else 'sequence_length'}")
        pieces = [Piece(("stem", size), lambda: build_stem(space), functools.partial(example_input, space, size))]
        current = spatial_after(size, space.stem.stride) if image else size
        width = space.stem.channels
        for index, (stage, stage_arch) in enumerate(zip(space.stages, arch.stages, strict=True)):
            after = spatial_after(current, stage.stride) if image else current
            first_size = current
            if stage.entry_projection:
                key: tuple[Any, ...] = ("projection", index, width, stage_arch.width, current)
                pieces.append(
                    Piece(
                        key,
                        functools.partial(EntryProjection, space.modality, width, stage_arch.width, stage.stride),
                        functools.partial(self._activations, width, current),
                    )
                )
                first_size = after
            for position, config in enumerate(stage_arch.blocks):
                block_size = first_size if position == 0 else after
                key = ("block", index, position == 0, width, stage_arch.width, block_size, config)
                build = functools.partial(self._block_module, index, position == 0, width, stage_arch.width, config)
                pieces.append(Piece(key, build, functools.partial(self._block_input, index, position == 0, width, stage_arch.width, block_size)))
            width = stage_arch.width
            current = after
        pieces.append(Piece(("head", width, current), functools.partial(build_head, space, width), functools.partial(self._activations, width, current)))
        return pieces

    def matrix(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]`` float64: column 0 the MACs, column 1 the parameters of each arch."""
        matrix = np.empty((len(archs), 2), dtype=np.float64)
        for row, arch in enumerate(archs):
            parameters, macs = self.cost(arch)
            matrix[row, 0] = macs
            matrix[row, 1] = parameters
        return matrix

    def _block_module(self, stage: int, first: bool, in_channels: int, out_channels: int, config: Any) -> torch.nn.Module:
        first_context, rest_context = stage_contexts(self.space, self.space.stages[stage], in_channels, out_channels)
        return type_of(config).static_class(config, first_context if first else rest_context)

    def _block_input(self, stage: int, first: bool, in_channels: int, out_channels: int, size: int) -> torch.Tensor:
        first_context, rest_context = stage_contexts(self.space, self.space.stages[stage], in_channels, out_channels)
        return self._activations((first_context if first else rest_context).in_channels, size)

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


__all__ = ["ArchCosts", "Piece", "PieceCosts"]
