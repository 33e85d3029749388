"""The sandwich rule (BigNAS, slimmable networks)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field, StrictBool, StrictInt

from ..space import SearchSpace
from .base import INPLACE, STRATEGIES, Phase, StrategyOptions, SubnetTask, TrainingStrategy, largest_only


def block_types(space: SearchSpace) -> list[str]:
    """The block types the space's stages allow, each once, in the order they are first listed."""
    return list(dict.fromkeys(choices.type for stage in space.stages for choices in stage.blocks))


class SandwichOptions(StrategyOptions):
    """``random_subnets``: random subnets per step besides the largest and the smallest. ``distill``: they and
    the smallest learn from the largest's predictions (in-place distillation) instead of the labels.
    ``largest_only_epochs``: the first epochs train only the largest subnet."""

    random_subnets: Annotated[StrictInt, Field(ge=0, le=64)] = 2
    distill: StrictBool = True
    largest_only_epochs: Annotated[StrictInt, Field(ge=0, le=100_000)] = 0


@STRATEGIES.decorator("sandwich")
class SandwichRule(TrainingStrategy[SandwichOptions]):
    """BigNAS / slimmable sandwich rule: the largest subnet, the smallest and ``random_subnets`` random ones each
    step, one optimizer update for all; with ``distill`` the others learn from the largest's predictions. Phase
    ``largest_only`` (the first ``largest_only_epochs``) trains only the largest, so the teacher has something to
    teach (tasks such as associative recall learn through a sudden transition that the shared updates of many
    subnets delay); phase ``sandwich`` follows.

    In a space whose stages allow several block types, "the smallest" is one per type: step ``s`` trains the smallest
    subnet built from the ``s mod T``-th type of the space (``SearchSpace.smallest(block_type)``, the stage's first type
    where a stage does not allow it), so every family's lower bound is trained, not only the first-listed one's. The
    largest (the teacher) stays the first-listed type's."""

    name = "sandwich"
    options_type = SandwichOptions

    def phase(self, epoch: int) -> Phase:
        if epoch < self.options.largest_only_epochs:
            return Phase("largest_only", largest_only(self.space))
        return Phase("sandwich", self.space)

    def tasks(self, phase: Phase, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        space = phase.space
        tasks = [SubnetTask(space.largest(), provides_teacher=True)]
        if phase.name == "largest_only":
            return tasks
        families = block_types(space)
        others = [space.smallest(families[step % len(families)]), *(space.sample(rng) for _ in range(self.options.random_subnets))]
        if self.options.distill:
            return tasks + [SubnetTask(arch, label_weight=0.0, teacher=INPLACE, teacher_weight=1.0) for arch in others]
        return tasks + [SubnetTask(arch) for arch in others]
