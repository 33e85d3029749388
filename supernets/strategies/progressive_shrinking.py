"""Once-for-All progressive shrinking (Cai et al., ICLR 2020, "Once-for-All: Train One Network and Specialize it
for Efficient Deployment").

The largest network trains first; then the elastic dimensions are unlocked one kind at a time, each phase training
subnets of everything unlocked so far with knowledge distillation from a frozen copy of the first phase's network:

========== ==================================================================== ======================
phase      what is elastic (besides the input size, elastic from the start)   subnets per step
========== ==================================================================== ======================
full       nothing: the largest network                                        1
kernel     fields declared ``shrinks="kernel"`` (through the kernel transforms) ``subnets_per_step.kernel``
depth_1    + stage depths: the two largest choices                             ``subnets_per_step.depth``
depth_2    + every depth                                                       ``subnets_per_step.depth``
width_1    + fields declared ``shrinks="width"`` and stage widths: two largest  ``subnets_per_step.width``
width_2    + every width, the ``shrinks="switch"`` fields and the block types   ``subnets_per_step.width``
========== ==================================================================== ======================

Which phase a block field belongs to is declared with the field (``choice(..., shrinks=...)`` in the block's
config), never listed here, so the strategy works for every block. Before each width phase every block reorders
its inner channels by importance (``Supernet.reorder_channels``: a permutation that leaves the largest network's
function unchanged), so the leading slices that smaller widths take are the most important channels.

Phase lengths are relative weights of the run's epochs (Once-for-All's epochs by default: 180 for the full network,
120 kernel, 25 + 120 depth, 25 + 120 width); each phase decays its own learning rate by a cosine from
``training.lr`` times its scale (Once-for-All's rates relative to a full-network rate of 0.1 by default: 3e-2 for
kernels, 2.5e-3 then 7.5e-3 for depth and width) and starts a fresh optimizer, as each of Once-for-All's phases is
a separate training run. A phase that unlocks nothing in the space (no kernel choices, at most two depths) is left
out and the other phases share its epochs.

Every step of a shrinking phase draws its subnets (each at a random input size) from the phase's space; each
learns from the labels plus ``distill`` times the soft cross-entropy with the frozen teacher's predictions on the
same batch at the same input size (Once-for-All's ``kd_ratio``; the teacher runs in training mode, as there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from ..blocks import block_type
from ..space import Arch, SearchSpace
from ..supernet import Supernet
from .base import (
    STRATEGIES,
    FrozenTeacher,
    Phase,
    Schedule,
    StrategyError,
    StrategyOptions,
    SubnetTask,
    TrainingStrategy,
    keep_first,
    keep_largest,
    restrict_space,
    warmup_cosine,
)

PHASES = ("full", "kernel", "depth_1", "depth_2", "width_1", "width_2")
"""The phases in order."""

TEACHER = "teacher"
"""The frozen copy taken when the first shrinking phase starts."""

NonNegative = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1e6)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PhaseEpochs(_Strict):
    """Relative length of each phase (weights of the run's epochs; 0 leaves a phase out)."""

    full: NonNegative = 180
    kernel: NonNegative = 120
    depth_1: NonNegative = 25
    depth_2: NonNegative = 120
    width_1: NonNegative = 25
    width_2: NonNegative = 120


class PhaseLearningRates(_Strict):
    """Peak learning rate of each phase as a multiple of ``training.lr``."""

    full: NonNegative = 1.0
    kernel: NonNegative = 0.3
    depth_1: NonNegative = 0.025
    depth_2: NonNegative = 0.075
    width_1: NonNegative = 0.025
    width_2: NonNegative = 0.075


class SubnetsPerStep(_Strict):
    """Subnets trained (gradients accumulated into one update) per step of each kind of phase."""

    kernel: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    depth: Annotated[StrictInt, Field(ge=1, le=64)] = 2
    width: Annotated[StrictInt, Field(ge=1, le=64)] = 4


class ProgressiveShrinkingOptions(StrategyOptions):
    """``phase_epochs``: relative phase lengths; ``phase_lr``: per-phase learning-rate scales; ``subnets_per_step``:
    per kind of phase; ``distill``: weight of the distillation loss from the frozen full network (0: labels only)."""

    phase_epochs: PhaseEpochs = PhaseEpochs()
    phase_lr: PhaseLearningRates = PhaseLearningRates()
    subnets_per_step: SubnetsPerStep = SubnetsPerStep()
    distill: NonNegative = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedPhase:
    """One phase of the run: its name, restricted space, first epoch and number of epochs."""

    name: str
    space: SearchSpace
    start: int
    epochs: int


def phase_space(space: SearchSpace, name: str) -> SearchSpace:
    """The space phase ``name`` trains: ``space`` with the dimensions not yet unlocked kept at their largest."""
    level = PHASES.index(name)
    depth_keep = None if level >= PHASES.index("depth_2") else keep_largest(2) if name == "depth_1" else keep_largest()
    width_keep = None if name == "width_2" else keep_largest(2) if name == "width_1" else keep_largest()

    def fields(type_name: str, field_name: str, choices: tuple[Any, ...]) -> list[Any]:
        kind = block_type(type_name).shrinks[field_name]
        unlocked = {
            "kernel": level >= PHASES.index("kernel"),
            "width": level >= PHASES.index("width_1"),
            "switch": name == "width_2",
        }[kind]
        rule = block_type(type_name).rules[field_name]
        count = len(choices) if unlocked and (kind != "width" or name == "width_2") else 2 if unlocked else 1
        remaining, kept = list(choices), list[Any]()
        while remaining and len(kept) < count:
            kept.append(rule.largest(tuple(remaining)))
            remaining.remove(kept[-1])
        return kept

    return restrict_space(
        space,
        depths=depth_keep,
        widths=width_keep,
        block_types=None if name == "width_2" else keep_first(),
        fields=fields,
    )


def allocate_epochs(weights: list[float], epochs: int) -> list[int]:
    """Split ``epochs`` in proportion to ``weights`` (largest remainders), at least one epoch each."""
    count = len(weights)
    if epochs < count:
        raise StrategyError(f"{count} phases need at least {count} epochs, got {epochs}")
    total = sum(weights)
    spare = epochs - count
    shares = [spare * weight / total for weight in weights]
    allotted = [1 + math.floor(share) for share in shares]
    by_remainder = sorted(range(count), key=lambda index: (-(shares[index] - math.floor(shares[index])), index))
    for index in by_remainder[: epochs - sum(allotted)]:
        allotted[index] += 1
    return allotted


def plan_phases(space: SearchSpace, options: ProgressiveShrinkingOptions, epochs: int | None) -> list[PlannedPhase]:
    """The phases of a run of ``epochs`` over ``space``: those with a positive weight that unlock something (with
    ``epochs`` None, one epoch each: which phases run, not how long)."""
    weights = options.phase_epochs.model_dump()
    kept: list[tuple[str, SearchSpace]] = []
    for name in PHASES:
        if weights[name] <= 0:
            continue
        restricted = phase_space(space, name)
        if kept and restricted == kept[-1][1]:
            continue
        kept.append((name, restricted))
    lengths = [1] * len(kept) if epochs is None else allocate_epochs([float(weights[name]) for name, _ in kept], epochs)
    planned, start = [], 0
    for (name, restricted), length in zip(kept, lengths, strict=True):
        planned.append(PlannedPhase(name, restricted, start, length))
        start += length
    return planned


def with_input_size(arch: Arch, size: int | None) -> Arch:
    """``arch`` at another input size (resolution or sequence length, whichever it has)."""
    if arch.resolution is not None:
        return dataclasses.replace(arch, resolution=size)
    return dataclasses.replace(arch, sequence_length=size)


def input_size(arch: Arch) -> int | None:
    return arch.resolution if arch.resolution is not None else arch.sequence_length


@STRATEGIES.decorator("progressive_shrinking")
class ProgressiveShrinking(TrainingStrategy[ProgressiveShrinkingOptions]):
    """Once-for-All progressive shrinking (see the module docstring)."""

    name = "progressive_shrinking"
    options_type = ProgressiveShrinkingOptions

    def __init__(self, space: SearchSpace, options: ProgressiveShrinkingOptions, schedule: Schedule) -> None:
        super().__init__(space, options, schedule)
        self.plan = plan_phases(space, options, schedule.epochs)

    @classmethod
    def check_options(cls, options: ProgressiveShrinkingOptions, *, epochs: int) -> list[tuple[str, str]]:
        problems = []
        if options.phase_epochs.full <= 0:
            problems.append(("phase_epochs.full", "must be > 0: the full network trains first and teaches the others"))
        if options.phase_lr.full <= 0:
            problems.append(("phase_lr.full", "must be > 0: the full network trains first and teaches the others"))
        return problems

    @classmethod
    def check_space(cls, options: ProgressiveShrinkingOptions, space: SearchSpace, *, epochs: int) -> list[tuple[str, str]]:
        """One epoch at least for every phase that unlocks something in ``space`` (the others are left out)."""
        if options.phase_epochs.full <= 0:
            return []
        used = [planned.name for planned in plan_phases(space, options, None)]
        if epochs < len(used):
            message = f"{len(used)} phases ({', '.join(used)}) need at least {len(used)} epochs, got training.epochs {epochs}; give unwanted phases weight 0"
            return [("phase_epochs", message)]
        return []

    def planned(self, epoch: int) -> PlannedPhase:
        for planned in reversed(self.plan):
            if epoch >= planned.start:
                return planned
        raise StrategyError(f"epoch must be >= 0, got {epoch}")

    def phase(self, epoch: int) -> Phase:
        planned = self.planned(epoch)
        first_shrinking = len(self.plan) > 1 and planned is self.plan[1]
        freeze = (TEACHER,) if first_shrinking and self.options.distill > 0 else ()
        return Phase(planned.name, planned.space, freeze=freeze, reset_optimizer=planned is not self.plan[0])

    def on_phase_start(self, supernet: Supernet, phase: Phase, epoch: int) -> None:
        if phase.name.startswith("width"):
            supernet.reorder_channels()

    def tasks(self, phase: Phase, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        space = phase.space
        if phase.name == "full":
            size = space.input_sizes[rng.integers(len(space.input_sizes))]
            return [SubnetTask(with_input_size(space.largest(), size))]
        count = getattr(self.options.subnets_per_step, phase.name.split("_")[0])
        tasks = []
        for _ in range(count):
            arch = space.sample(rng)
            if self.options.distill > 0:
                teacher = FrozenTeacher(TEACHER, with_input_size(self.space.largest(), input_size(arch)))
                tasks.append(SubnetTask(arch, teacher=teacher, teacher_weight=float(self.options.distill)))
            else:
                tasks.append(SubnetTask(arch))
        return tasks

    def learning_rate(self, epoch: int, step: int) -> float:
        """Each phase: a cosine from ``training.lr`` x its scale to zero over the phase (the first phase after the
        run's warm-up)."""
        planned = self.planned(epoch)
        per_epoch = self.schedule.steps_per_epoch
        peak = self.schedule.lr * getattr(self.options.phase_lr, planned.name)
        warmup = self.schedule.warmup_epochs * per_epoch if planned is self.plan[0] else 0
        return warmup_cosine(peak, (epoch - planned.start) * per_epoch + step, planned.epochs * per_epoch, warmup)


__all__ = ["PHASES", "PlannedPhase", "ProgressiveShrinking", "ProgressiveShrinkingOptions", "allocate_epochs", "phase_space", "plan_phases"]
