"""Training strategies: which subnets each step trains, and from what targets.

A strategy turns one optimisation step into a list of ``SubnetTask`` (arch, whether it learns from the labels or
from the teacher's soft predictions). Samplers take an explicit ``numpy.random.Generator``. Later strategies
(progressive shrinking, DepS, SortedNet, Mixture-of-Supernets) register here behind the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..registry import Registry
from ..space import Arch, SearchSpace


@dataclass(frozen=True, slots=True)
class SubnetTask:
    arch: Arch
    teacher: bool
    distill: bool


class TrainingStrategy(ABC):
    name: ClassVar[str]

    def __init__(self, space: SearchSpace, *, random_subnets: int, distill: bool, largest_only_epochs: int = 0) -> None:
        self.space = space
        self.random_subnets = random_subnets
        self.distill = distill
        self.largest_only_epochs = largest_only_epochs

    @abstractmethod
    def subnets(self, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        """The subnets of one step; a teacher, if any, comes first."""


STRATEGIES: Registry[type[TrainingStrategy]] = Registry("training strategy", discover="nas.supernets.strategies")
"""Every training strategy by its YAML name (``training.strategy``); each module of this package registers its own."""
