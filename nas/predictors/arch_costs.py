"""(parameters, MACs) of archs, counted once per arch: the cost features of predictors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from nas.supernets.costs import arch_cost
from nas.supernets.space import Arch, SearchSpace


class ArchCosts:
    """Exact parameter and MAC counts (``nas.supernets.costs.arch_cost``) of archs of ``space``, cached per arch.

    Counting builds the static subnet once (tens to hundreds of milliseconds); the global torch random state is
    left as it was. ``ArchCosts.for_space(space)`` shares one cache per space within the process, so predictors
    of the same space never count an arch twice.
    """

    _shared: ClassVar[dict[SearchSpace, ArchCosts]] = {}

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._costs: dict[Arch, tuple[int, int]] = {}

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
            with torch.random.fork_rng(devices=[]):
                cached = arch_cost(self.space, arch)
            self._costs[arch] = cached
        return cached

    def matrix(self, archs: Sequence[Arch]) -> np.ndarray:
        """``[N, 2]`` float64: column 0 the MACs, column 1 the parameters of each arch."""
        rows = [self.cost(arch) for arch in archs]
        return np.asarray([[float(macs), float(params)] for params, macs in rows], dtype=np.float64).reshape(len(rows), 2)


__all__ = ["ArchCosts"]
