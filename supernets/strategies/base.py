"""The training-strategy interface: which subnets each step trains, with which loss, teacher and learning rate,
in which phase.

A strategy is one module of this package (or a user's plugin) registered in ``STRATEGIES`` under its YAML name
(``training.strategy``). It owns:

* its YAML options: a ``StrategyOptions`` model (pydantic, unknown keys rejected) whose fields are the keys of
  ``training:`` beyond the common ones (``epochs``, ``lr``, ...), validated with their YAML path;
* the network it trains (``build_supernet``, by default the plain ``Supernet``; a strategy with its own weights,
  such as expert copies and a router, returns a ``Supernet`` subclass), used for training and when a run reloads;
* the phase of every epoch (``phase``): a name recorded per epoch in ``log.jsonl`` and ``metrics.json``, the
  (possibly restricted, see ``restrict_space``) space the phase trains, frozen copies of the network to take when
  the phase starts, and whether the optimizer starts afresh;
* a transform of the supernet when a phase starts (``on_phase_start``, such as reordering channels by importance);
* the subnets of every step (``tasks``): each a ``SubnetTask`` with its loss weights, its teacher (the in-place
  teacher of this step, a frozen copy, or none) and a learning-rate scale;
* the learning rate of every step (``learning_rate``, by default the run's warm-up + cosine ``Schedule``);
* any state it needs to continue after a restart (``state_dict`` / ``load_state_dict``, JSON values), saved in
  every checkpoint.

The training loop (``nas.training.loop``) owns nothing strategy-specific: it asks for the phase and the tasks,
computes each task's loss as the task says, keeps the teachers and applies the optimizer updates.
Samplers take an explicit ``numpy.random.Generator``; the loop seeds it per epoch, so a resumed run draws exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..blocks import block_type
from ..registry import NAME_PATTERN, Registry
from ..space import Arch, SearchSpace
from ..supernet import Supernet


class StrategyError(RuntimeError):
    """A strategy that breaks the interface's rules (a task with no teacher to learn from, a bad restriction)."""


class StrategyOptions(BaseModel):
    """The YAML options of a strategy: subclass it with typed, bounded fields and defaults. Its fields are keys of
    ``training:`` next to the common ones and must not repeat them; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class InplaceTeacher:
    """The predictions, detached, of this step's latest earlier task with ``provides_teacher`` (BigNAS in-place
    distillation: the largest subnet teaches the others of the same step)."""


INPLACE = InplaceTeacher()
"""The in-place teacher of the step (the one value of ``InplaceTeacher``)."""


@dataclass(frozen=True, slots=True)
class FrozenTeacher:
    """A frozen copy of the network, named ``name`` in a phase's ``freeze`` and taken when that phase started,
    evaluated at ``arch``. The copy is never trained; it runs in training mode (batch statistics, as Once-for-All's
    teacher does) without gradients, on the batch as prepared for ``arch``."""

    name: str
    arch: Arch


Teacher = InplaceTeacher | FrozenTeacher


@dataclass(frozen=True, slots=True)
class SubnetTask:
    """One subnet of one step and how it learns.

    loss = ``label_weight`` * cross-entropy with the labels (with the run's label smoothing)
         + ``teacher_weight`` * soft cross-entropy with ``teacher``'s predictions (a term with weight 0 is skipped).

    ``provides_teacher``: this task's predictions, detached, become the step's in-place teacher for later tasks.
    ``lr_scale``: multiplies the step's learning rate for this task's update. Consecutive tasks with equal scales
    accumulate their gradients into one optimizer update; a different scale starts a new update.
    """

    arch: Arch
    label_weight: float = 1.0
    teacher: Teacher | None = None
    teacher_weight: float = 0.0
    provides_teacher: bool = False
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("label_weight", "teacher_weight", "lr_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise StrategyError(f"SubnetTask.{name} must be a finite number >= 0, got {value!r}")
        if self.label_weight == 0 and self.teacher_weight == 0:
            raise StrategyError("SubnetTask needs label_weight > 0 or teacher_weight > 0, got both 0")
        if (self.teacher is None) != (self.teacher_weight == 0):
            raise StrategyError(
                f"SubnetTask.teacher_weight must be > 0 exactly when a teacher is given, got teacher={self.teacher!r} and teacher_weight={self.teacher_weight}"
            )


@dataclass(frozen=True, slots=True)
class Phase:
    """What a strategy trains during an epoch. Phases are told apart by ``name``: the epoch whose phase name
    differs from the previous epoch's starts a phase. Then, in this order, the loop takes the frozen copies named
    in ``freeze`` (the network as the previous phase left it; a name frozen again replaces its earlier copy),
    starts a fresh optimizer if ``reset_optimizer``, and calls ``TrainingStrategy.on_phase_start``. Frozen copies
    live until the run ends and are saved with every checkpoint."""

    name: str
    space: SearchSpace
    freeze: tuple[str, ...] = ()
    reset_optimizer: bool = False

    def __post_init__(self) -> None:
        for name in (self.name, *self.freeze):
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                raise StrategyError(f"phase and frozen-copy names must be lower_snake_case (letters, digits, _), got {name!r}")


def warmup_cosine(peak: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps (at most ``total - 1``), then cosine decay to zero at
    step ``total``."""
    warmup = min(warmup, total - 1)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True, slots=True)
class Schedule:
    """The run's step counts and its default learning rate: ``training.lr`` after ``warmup_epochs`` of linear
    warm-up, decaying to zero over the run by a cosine."""

    lr: float
    epochs: int
    warmup_epochs: int
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def at(self, global_step: int) -> float:
        """The learning rate of step ``global_step`` (counted from the start of the run)."""
        return warmup_cosine(self.lr, global_step, self.total_steps, self.warmup_epochs * self.steps_per_epoch)


OptionsT = TypeVar("OptionsT", bound=StrategyOptions)


class TrainingStrategy(ABC, Generic[OptionsT]):
    """Base of every training strategy (see the module docstring). Subclasses set ``name`` and ``options_type``,
    implement ``tasks`` and override the other hooks they need; every hook must be a function of its arguments,
    the options and the state that ``state_dict`` returns, so that a resumed run continues identically."""

    name: ClassVar[str]
    options_type: ClassVar[type[StrategyOptions]] = StrategyOptions

    def __init__(self, space: SearchSpace, options: OptionsT, schedule: Schedule) -> None:
        if not isinstance(options, self.options_type):
            raise StrategyError(f"strategy {self.name!r} takes {self.options_type.__name__} options, got {type(options).__name__}")
        self.space = space
        self.options = options
        self.schedule = schedule

    @classmethod
    def check_options(cls, options: OptionsT, *, epochs: int) -> list[tuple[str, str]]:
        """Rules that join the options with the run's length: ``(option name, message)`` for each broken one
        (reported as ``training.<option name>: <message>``)."""
        return []

    @classmethod
    def check_space(cls, options: OptionsT, space: SearchSpace, *, epochs: int) -> list[tuple[str, str]]:
        """Rules that join the options with the space (and the run's length): ``(option name, message)`` for each
        broken one (reported as ``training.<option name>: <message>`` by ``nas validate`` and before training)."""
        return []

    @classmethod
    def build_supernet(cls, space: SearchSpace, options: OptionsT) -> Supernet:
        """The network trained over ``space`` (built after the run's seed is set; its weights are then loaded from
        a checkpoint where one exists). ``set_active`` and ``extract`` must keep their meaning, so that evaluation
        and export work unchanged."""
        return Supernet(space)

    def phase(self, epoch: int) -> Phase:
        """The phase of ``epoch`` (0-based). By default one phase, ``train``, over the whole space."""
        return Phase("train", self.space)

    def on_phase_start(self, supernet: Supernet, phase: Phase, epoch: int) -> None:
        """Transform the supernet as ``phase`` starts at ``epoch`` (in place, under ``torch.no_grad``); by default
        nothing. Runs once per phase: a run resumed inside a phase does not run it again."""

    @abstractmethod
    def tasks(self, phase: Phase, rng: np.random.Generator, epoch: int, step: int) -> list[SubnetTask]:
        """The subnets of one step of ``phase``, in order (a task providing the in-place teacher comes before the
        tasks that learn from it). The loop logs the loss and accuracy of the first task."""

    def learning_rate(self, epoch: int, step: int) -> float:
        """The learning rate of ``step`` of ``epoch`` before each task's ``lr_scale``; by default ``schedule``."""
        return self.schedule.at(epoch * self.schedule.steps_per_epoch + step)

    def state_dict(self) -> dict[str, Any]:
        """What the strategy needs, beyond its options and the epoch, to continue after a restart (JSON values).
        Saved with every checkpoint, at the end of an epoch."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise StrategyError(f"strategy {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")


ChoiceFilter = Callable[[tuple[Any, ...]], Sequence[Any]]
"""Choices of one decision variable -> the ones to keep."""
FieldFilter = Callable[[str, str, tuple[Any, ...]], Sequence[Any]]
"""(block type, field name, choices) -> the ones to keep."""


def keep_largest(count: int = 1) -> ChoiceFilter:
    """Keep the ``count`` largest of numeric choices (depths, widths, input sizes)."""

    def keep(choices: tuple[Any, ...]) -> Sequence[Any]:
        return sorted(choices, reverse=True)[:count]

    return keep


def keep_smallest(count: int = 1) -> ChoiceFilter:
    """Keep the ``count`` smallest of numeric choices."""

    def keep(choices: tuple[Any, ...]) -> Sequence[Any]:
        return sorted(choices)[:count]

    return keep


def keep_first(count: int = 1) -> ChoiceFilter:
    """Keep the first ``count`` listed choices (block types: the first is the one ``largest()`` picks)."""

    def keep(choices: tuple[Any, ...]) -> Sequence[Any]:
        return choices[:count]

    return keep


def keep_largest_fields(count: int = 1) -> FieldFilter:
    """Keep the ``count`` largest choices of every block field, by the field's own rule (``true`` over ``false``,
    the first listed option)."""

    def keep(type_name: str, field_name: str, choices: tuple[Any, ...]) -> Sequence[Any]:
        rule = block_type(type_name).rules[field_name]
        remaining = list(choices)
        kept: list[Any] = []
        while remaining and len(kept) < count:
            value = rule.largest(tuple(remaining))
            kept.append(value)
            remaining.remove(value)
        return kept

    return keep


def _subset(where: str, choices: tuple[Any, ...], kept: Sequence[Any] | None) -> tuple[Any, ...]:
    """``choices`` reduced to ``kept`` (all of them when None), in their original order."""
    if kept is None:
        return choices
    values = list(kept)
    if not values or any(value not in choices for value in values):
        raise StrategyError(f"a restriction of {where} must keep a non-empty subset of {list(choices)}, got {values}")
    return tuple(value for value in choices if value in values)


def restrict_space(
    space: SearchSpace,
    *,
    input_sizes: ChoiceFilter | None = None,
    depths: ChoiceFilter | None = None,
    widths: ChoiceFilter | None = None,
    block_types: ChoiceFilter | None = None,
    fields: FieldFilter | None = None,
) -> SearchSpace:
    """A copy of ``space`` keeping, for every decision variable, the choices its filter keeps (all where the
    filter is None), in their original order. ``block_types`` filters the type names allowed at each stage's
    positions. Every arch of the result is an arch of ``space``, so the supernet built for ``space`` trains it.
    Raises ``StrategyError`` naming the variable when a filter keeps nothing or a value that is not a choice."""

    def apply(keep: ChoiceFilter | None, choices: tuple[Any, ...]) -> Sequence[Any] | None:
        return None if keep is None else keep(choices)

    size_name = "resolution" if space.modality == "image" else "sequence_length"
    sizes = _subset(size_name, space.input_sizes, apply(input_sizes, space.input_sizes))
    stages = []
    for index, stage in enumerate(space.stages):
        where = f"stages[{index}]"
        type_names = tuple(choices.type for choices in stage.blocks)
        kept_types = _subset(f"{where}.blocks[*].type", type_names, apply(block_types, type_names))
        blocks = []
        for choices in stage.blocks:
            if choices.type not in kept_types:
                continue
            if fields is not None:
                restricted = []
                for name, values in choices.fields:
                    kept = _subset(f"{where}.{choices.type}.{name}", values, fields(choices.type, name, values))
                    restricted.append((name, kept))
                choices = dataclasses.replace(choices, fields=tuple(restricted))
            blocks.append(choices)
        stages.append(
            dataclasses.replace(
                stage,
                depths=_subset(f"{where}.depth", stage.depths, apply(depths, stage.depths)),
                widths=_subset(f"{where}.width", stage.widths, apply(widths, stage.widths)),
                blocks=tuple(blocks),
            )
        )
    if space.modality == "image":
        return dataclasses.replace(space, stages=tuple(stages), resolutions=sizes)
    return dataclasses.replace(space, stages=tuple(stages), sequence_lengths=sizes)


def largest_only(space: SearchSpace) -> SearchSpace:
    """The space whose only arch is ``space.largest()``."""
    return restrict_space(
        space, input_sizes=keep_largest(), depths=keep_largest(), widths=keep_largest(), block_types=keep_first(), fields=keep_largest_fields()
    )


STRATEGIES: Registry[type[TrainingStrategy[Any]]] = Registry("training strategy", discover="nas.supernets.strategies")
"""Every training strategy by its YAML name (``training.strategy``); each module of this package registers its own."""
