"""SortedNet (Valipour et al. 2023, "SortedNet: A Scalable and Generalized Framework for Training Modular Deep Neural
Networks"): a sorted family of nested subnets along one size knob, trained together.

One knob ``t`` in ``[0, 1]`` scales every dimension the space has (``sorted_arch``): each numeric decision of the
space's walk (depth, width, input size, numeric block fields such as ``kernel_size`` or ``expand_ratio``) takes the
choice at index ``round(t * (n - 1))`` (half up) of its ``n`` choices sorted ascending, and every other decision
(names, booleans, the block type) its largest (the field rule's ``largest``, the first-listed type). Member ``k`` of
a family of size ``K`` is the arch at ``t = k / (K - 1)``, so the family runs from (nearly) the smallest subnet to
``space.largest()``, and every member contains the previous one in every dimension.

A family keeps strictly increasing parameter counts (``sorted_members``): a member equal to the one before it is
dropped (the first ``t`` that gives an arch is its ``t``), and of consecutive distinct members with the same count
(archs that differ only in the input size) the first, the cheapest, stands for them all, except at the top of the
family, where ``space.largest()`` does.

Each training step trains ``subnets_per_step`` members drawn at random from the loop's epoch generator, the largest
always among them when ``always_largest``, their gradients accumulated into one optimizer update; SortedNet trains
them on the labels, and ``distill`` makes the others learn from the largest's predictions instead (in-place
distillation, as the sandwich rule does).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any

import numpy as np
from pydantic import Field, StrictBool, StrictInt

from ..blocks import FloatRule, IntRule
from ..elastic import count_parameters
from ..space import Arch, SearchSpace
from ..supernet import build_static
from ..walk import Decision
from .base import INPLACE, STRATEGIES, Phase, Schedule, StrategyError, StrategyOptions, SubnetTask, TrainingStrategy

logger = logging.getLogger(__name__)

MAX_FAMILY_SIZE = 256


@dataclass(frozen=True, slots=True)
class SortedMember:
    """One member of a sorted family: its place ``t`` on the size knob (as a fraction ``k / (K - 1)``), its arch and
    its parameter count."""

    t: Fraction
    arch: Arch
    params: int


def is_numeric(decision: Decision) -> bool:
    """Whether the size knob moves ``decision`` through its choices (integers and numbers: depth, width, input size,
    numeric block fields); the others (names, booleans, block types) stay at their largest."""
    return isinstance(decision.rule, IntRule | FloatRule)


def knob_index(t: Fraction, count: int) -> int:
    """``round(t * (count - 1))``, halves rounded up, computed exactly."""
    return math.floor(t * (count - 1) + Fraction(1, 2))


def sorted_arch(space: SearchSpace, t: float | Fraction) -> Arch:
    """The arch of ``space`` at size ``t`` in ``[0, 1]`` (module docstring): numeric decisions at index
    ``round(t * (n - 1))`` of their sorted choices, the others at their largest. A float ``t`` is read as the nearest
    fraction with a denominator up to 10^6, so ``sorted_arch(space, 1 / 3)`` is member 1 of a family of 4."""
    fraction = t if isinstance(t, Fraction) else Fraction(t).limit_denominator(1_000_000)
    if not 0 <= fraction <= 1:
        raise StrategyError(f"the size knob t must be in [0, 1], got {t}")

    def choose(decision: Decision) -> Any:
        if not is_numeric(decision):
            return decision.largest
        ordered = sorted(decision.choices)
        return ordered[knob_index(fraction, len(ordered))]

    return space.walk().walk(choose)


def arch_parameters(space: SearchSpace, arch: Arch) -> int:
    """The parameter count of ``arch``'s static network."""
    return count_parameters(build_static(space, arch))


@functools.lru_cache(maxsize=32)
def sorted_members(space: SearchSpace, family_size: int) -> tuple[SortedMember, ...]:
    """The sorted family of ``family_size`` (K) members of ``space``, smallest first: member ``k`` at ``t = k / (K -
    1)``; a member equal to the previous one is dropped, and a run of distinct members with one parameter count
    (archs that differ only in the input size) is kept as its first member, except the last run, kept as its last,
    ``space.largest()``. The result starts at ``t = 0``, has strictly increasing parameter counts, is nested (every
    dimension non-decreasing) and ends with ``space.largest()``. Raises ``StrategyError`` when ``family_size`` is
    outside 2..256 or fewer than two members remain."""
    if isinstance(family_size, bool) or not isinstance(family_size, int) or not 2 <= family_size <= MAX_FAMILY_SIZE:
        raise StrategyError(f"training.family_size must be an integer in [2, {MAX_FAMILY_SIZE}], got {family_size!r}")
    runs: list[list[SortedMember]] = []
    for index in range(family_size):
        t = Fraction(index, family_size - 1)
        arch = sorted_arch(space, t)
        previous = runs[-1][-1] if runs else None
        if previous is not None and arch == previous.arch:
            continue
        member = SortedMember(t, arch, arch_parameters(space, arch))
        if previous is not None and member.params < previous.params:
            raise StrategyError(
                f"the sorted family of space {space.name!r} is not increasing in parameters: {arch.short_name()} at t={t} has "
                f"{member.params:,}, fewer than {previous.arch.short_name()} ({previous.params:,}) before it"
            )
        if previous is not None and member.params == previous.params:
            runs[-1].append(member)
        else:
            runs.append([member])
    members = [run[0] for run in runs[:-1]] + [runs[-1][-1]]
    if len(members) < 2:
        raise StrategyError(
            f"training.family_size: the space {space.name!r} gives only {len(members)} distinct member(s) with increasing parameter counts "
            f"for family_size {family_size}; the sorted strategy needs at least 2, so the space needs a numeric choice that changes the "
            "parameter count (depth, width or a numeric block field such as kernel_size or expand_ratio with two or more choices)"
        )
    return tuple(members)


def sorted_family(space: SearchSpace, family_size: int) -> list[Arch]:
    """The archs of ``sorted_members(space, family_size)``, smallest first, ``space.largest()`` last."""
    return [member.arch for member in sorted_members(space, family_size)]


class SortedOptions(StrategyOptions):
    """``family_size``: K, the members along the size knob before duplicates are dropped. ``subnets_per_step``:
    members trained per step (all of them when the family has no more). ``always_largest``: the largest member is
    one of them every step. ``distill``: the others learn from the largest's predictions instead of the labels
    (needs ``always_largest``)."""

    family_size: Annotated[StrictInt, Field(ge=2, le=MAX_FAMILY_SIZE)] = 8
    subnets_per_step: Annotated[StrictInt, Field(ge=1, le=MAX_FAMILY_SIZE)] = 2
    always_largest: StrictBool = True
    distill: StrictBool = False


@STRATEGIES.decorator("sorted")
class SortedNet(TrainingStrategy[SortedOptions]):
    """SortedNet: one phase, ``sorted``, over the whole space; every step trains ``subnets_per_step`` members of the
    sorted family (``sorted_members``), largest first, drawn without replacement from the epoch's generator (the
    largest always among them with ``always_largest``), all with learning-rate scale 1, so their gradients make one
    optimizer update. ``family`` holds the members, smallest first."""

    name = "sorted"
    options_type = SortedOptions

    def __init__(self, space: SearchSpace, options: SortedOptions, schedule: Schedule) -> None:
        super().__init__(space, options, schedule)
        self.members = sorted_members(space, options.family_size)
        self.family: tuple[Arch, ...] = tuple(member.arch for member in self.members)
        if options.subnets_per_step > len(self.family):
            logger.warning(
                "the sorted family of %s has %d distinct members (family_size %d), fewer than subnets_per_step %d: every step trains all of them",
                space.name,
                len(self.family),
                options.family_size,
                options.subnets_per_step,
            )

    @classmethod
    def check_options(cls, options: SortedOptions, *, epochs: int) -> list[tuple[str, str]]:
        problems = []
        if options.subnets_per_step > options.family_size:
            problems.append(("subnets_per_step", f"must be at most family_size ({options.family_size}), got {options.subnets_per_step}"))
        if options.always_largest and options.subnets_per_step == 1:
            problems.append(
                ("subnets_per_step", "must be at least 2 with always_largest: true (1 would train only the largest member); or set always_largest: false")
            )
        if options.distill and not options.always_largest:
            problems.append(("distill", "needs always_largest: true (the in-place teacher is the step's largest member)"))
        return problems

    @classmethod
    def check_space(cls, options: SortedOptions, space: SearchSpace, *, epochs: int) -> list[tuple[str, str]]:
        """Rules that join the options with the space: ``(option name, message)`` for each broken one (the family
        must keep at least two members)."""
        try:
            sorted_members(space, options.family_size)
        except StrategyError as error:
            return [("family_size", str(error).removeprefix("training.family_size: "))]
        return []

    def phase(self, epoch: int) -> Phase:
        return Phase("sorted", self.space)

    def draw(self, rng: np.random.Generator) -> list[int]:
        """Indices into ``family`` of one step's members, largest first."""
        size = len(self.family)
        count = min(self.options.subnets_per_step, size)
        if self.options.always_largest:
            chosen = {size - 1, *(int(index) for index in rng.choice(size - 1, size=count - 1, replace=False))}
        else:
            chosen = {int(index) for index in rng.choice(size, size=count, replace=False)}
        return sorted(chosen, reverse=True)

    def tasks(self, phase: Phase, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        archs = [self.family[index] for index in self.draw(rng)]
        if not self.options.distill:
            return [SubnetTask(arch) for arch in archs]
        teacher, *students = archs
        return [SubnetTask(teacher, provides_teacher=True)] + [SubnetTask(arch, label_weight=0.0, teacher=INPLACE, teacher_weight=1.0) for arch in students]


__all__ = ["SortedMember", "SortedNet", "SortedOptions", "arch_parameters", "is_numeric", "knob_index", "sorted_arch", "sorted_family", "sorted_members"]
