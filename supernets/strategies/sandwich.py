"""The sandwich rule (BigNAS, slimmable networks)."""

from __future__ import annotations

import numpy as np

from .base import STRATEGIES, SubnetTask, TrainingStrategy


@STRATEGIES.decorator("sandwich")
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


