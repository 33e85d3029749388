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

from .space import Arch, SearchSpace


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


class SandwichRule(TrainingStrategy):
    """BigNAS / slimmable sandwich rule: the largest subnet, the smallest and ``random_subnets`` random ones each
    step; with ``distill`` the others learn from the largest's predictions (in-place distillation). During the
    first ``largest_only_epochs`` only the largest trains, so the teacher has something to teach (tasks such as
    associative recall learn through a sudden transition that the shared updates of many subnets delay)."""

    name = "sandwich"

    def subnets(self, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        tasks = [SubnetTask(self.space.largest(), teacher=True, distill=False)]
        if epoch < self.largest_only_epochs:
            return tasks
        others = [self.space.smallest(), *(self.space.sample(rng) for _ in range(self.random_subnets))]
        tasks += [SubnetTask(arch, teacher=False, distill=self.distill) for arch in others]
        return tasks


STRATEGIES: dict[str, type[TrainingStrategy]] = {strategy.name: strategy for strategy in (SandwichRule,)}
