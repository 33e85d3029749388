"""Delayed ε-Shrinking (DεpS; "DεpS: Delayed ε-Shrinking for Faster Once-For-All Training", 2024).

Once-for-All shrinks a fully trained network over many phases; the sandwich rule shrinks from the first step.
DεpS starts shrinking once the full network is partially trained (about half way), then shrinks every dimension
at once, with in-place distillation from the full network and subnet learning rates raised step by step:

* phase ``full`` (the first ``full_fraction`` of the epochs): the largest network alone, at random input sizes;
* phase ``shrink`` (the rest): every step trains the largest network (at the largest input size) on the labels
  (it provides the in-place teacher), then the smallest and ``random_subnets`` random subnets, which learn from the labels weighted
  ``label_weight`` plus the largest's predictions weighted ``1 - label_weight``; their update uses the step's
  learning rate times the subnet learning-rate scale.

The abstract does not give the increment rule ("heuristics that dynamically adjust subnet learning rates
incrementally"); nasforge's rule, with its constants as options: the subnet scale starts at ``subnet_lr_start``
when shrinking starts and rises in ``subnet_lr_steps`` equal steps, one per equal slice of the first
``subnet_lr_ramp`` of the shrink phase, to 1 (so subnets first follow the teacher gently, then train at the full
rate). The largest network's updates always use the full rate, and its own update comes first, so the teacher is
never slowed.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from pydantic import Field, StrictFloat, StrictInt

from ..space import SearchSpace
from .base import INPLACE, STRATEGIES, Phase, Schedule, StrategyError, StrategyOptions, SubnetTask, TrainingStrategy
from .progressive_shrinking import phase_space, with_input_size

Fraction = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]


class DepsOptions(StrategyOptions):
    """``full_fraction``: share of the epochs the full network trains alone; ``random_subnets``: random subnets per
    step besides the largest and the smallest; ``label_weight``: weight of the labels in a subnet's loss (the rest
    is distillation from the largest); ``subnet_lr_start``, ``subnet_lr_steps``, ``subnet_lr_ramp``: the
    incremental subnet learning-rate rule (see the module docstring)."""

    full_fraction: Annotated[StrictFloat | StrictInt, Field(gt=0, lt=1)] = 0.5
    random_subnets: Annotated[StrictInt, Field(ge=0, le=64)] = 2
    label_weight: Fraction = 0.0
    subnet_lr_start: Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)] = 0.1
    subnet_lr_steps: Annotated[StrictInt, Field(ge=1, le=1000)] = 4
    subnet_lr_ramp: Fraction = 0.5


def full_epochs(options: DepsOptions, epochs: int) -> int:
    """Epochs of the ``full`` phase: ``full_fraction`` of the run, rounded, leaving at least one on each side."""
    return min(max(1, round(options.full_fraction * epochs)), epochs - 1)


@STRATEGIES.decorator("deps")
class DelayedShrinking(TrainingStrategy[DepsOptions]):
    """Delayed ε-Shrinking (see the module docstring)."""

    name = "deps"
    options_type = DepsOptions

    def __init__(self, space: SearchSpace, options: DepsOptions, schedule: Schedule) -> None:
        super().__init__(space, options, schedule)
        if schedule.epochs < 2:
            raise StrategyError(f"deps needs at least 2 epochs (a full phase and a shrink phase), got {schedule.epochs}")
        self.full_epochs = full_epochs(options, schedule.epochs)
        self.full_space = phase_space(space, "full")

    @classmethod
    def check_options(cls, options: DepsOptions, *, epochs: int) -> list[tuple[str, str]]:
        if epochs < 2:
            return [("full_fraction", f"deps needs at least 2 epochs (a full phase and a shrink phase), got training.epochs {epochs}")]
        return []

    def phase(self, epoch: int) -> Phase:
        if epoch < self.full_epochs:
            return Phase("full", self.full_space)
        return Phase("shrink", self.space)

    def subnet_lr_scale(self, epoch: int, step: int) -> float:
        """The subnets' learning-rate scale at ``step`` of ``epoch`` (a shrink-phase epoch)."""
        options = self.options
        per_epoch = self.schedule.steps_per_epoch
        shrink_steps = (self.schedule.epochs - self.full_epochs) * per_epoch
        ramp = options.subnet_lr_ramp * shrink_steps
        done = (epoch - self.full_epochs) * per_epoch + step
        if ramp <= 0 or done >= ramp:
            return 1.0
        level = math.floor(done / ramp * options.subnet_lr_steps)
        return float(options.subnet_lr_start + (1 - options.subnet_lr_start) * level / options.subnet_lr_steps)

    def tasks(self, phase: Phase, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        space = phase.space
        if phase.name == "full":
            size = space.input_sizes[rng.integers(len(space.input_sizes))]
            return [SubnetTask(with_input_size(space.largest(), size))]
        scale = self.subnet_lr_scale(epoch, step)
        label = float(self.options.label_weight)
        tasks = [SubnetTask(space.largest(), provides_teacher=True)]
        for arch in (space.smallest(), *(space.sample(rng) for _ in range(self.options.random_subnets))):
            if label >= 1:
                tasks.append(SubnetTask(arch, lr_scale=scale))
            else:
                tasks.append(SubnetTask(arch, label_weight=label, teacher=INPLACE, teacher_weight=1 - label, lr_scale=scale))
        return tasks


__all__ = ["DelayedShrinking", "DepsOptions", "full_epochs"]
