"""The one walk over a search space's decision variables.

A space is a tree of decisions, always walked in the same order::

    per stage i:     s{i}.depth, s{i}.width
      per position j < depth:
                     s{i}.b{j}.type
                     s{i}.b{j}.{type}.{field}   for each field of the chosen type, in declaration order
    then:            size                       (resolution or sequence length)

A position's decisions are active only when the stage's depth reaches past it, and a field's only under the block
type chosen at its position. ``SpaceWalk`` lists every decision once (``decisions``, in walk order, with the
condition under which each is active) and derives from that one walk everything that needs the space's variables:
sampling, exact counting, the largest and smallest arch, checking an arch, arch <-> parameter values, mutation and
feature vectors for predictors. The Optuna encoding (``nas.search.encoding``) and the evolution sampler use it too.

``SearchSpace.sample(rng)`` draws one ``rng.integers(len(choices))`` per active decision in walk order (single-choice
decisions included), so a seed gives the same archs as the hand-written sampler this walk replaced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .blocks import IntRule, OptionRule, block_type, choice_index, choice_problem, type_of
from .space import Arch, ArchError, Problem, SearchSpace, StageArch, StageSpace

DecisionKind = Literal["size", "depth", "width", "type", "field"]

Choose = Callable[["Decision"], Any]
"""Picks the value of one active decision (called in walk order)."""

COUNT_RULE = IntRule(1, 2**62)
"""The rule of depth, width and input-size decisions: their values are integers."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision variable of a space.

    ``name`` is the stable parameter name (``size``, ``s0.depth``, ``s0.width``, ``s0.b1.type``,
    ``s0.b1.mbconv.kernel_size``); ``path`` is where its value sits in an arch (``resolution``, ``stages[0].width``,
    ``stages[0].blocks[1].kernel_size``). ``stage`` and ``position`` are -1, ``block_type`` and ``field`` empty, where
    they do not apply (the size has no stage; depth and width have no position).

    A block decision is active when the stage's depth exceeds ``position``, and a field's only when ``block_type`` is
    the type chosen at its position. ``depth_conditional`` / ``type_conditional`` say whether those conditions can
    fail (a position below every depth choice always exists; a position that allows one block type always has it).
    ``rule`` is the type of the values (a block field's own rule; integers for depth, width and size; names for
    block types): a value must have it exactly to be one of the choices (``choice_index``).
    """

    name: str
    path: str
    kind: DecisionKind
    choices: tuple[Any, ...]
    largest: Any
    smallest: Any
    stage: int = -1
    position: int = -1
    block_type: str = ""
    field: str = ""
    depth_conditional: bool = False
    type_conditional: bool = False
    rule: Any = COUNT_RULE

    @property
    def free(self) -> bool:
        """Whether there is anything to decide (more than one choice)."""
        return len(self.choices) > 1

    @property
    def condition(self) -> str:
        """When the decision is active, in words of the other decisions' names (``"always"`` when it always is)."""
        parts = []
        if self.depth_conditional:
            parts.append(f"s{self.stage}.depth > {self.position}")
        if self.type_conditional:
            parts.append(f"s{self.stage}.b{self.position}.type == {self.block_type!r}")
        return " and ".join(parts) or "always"

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether the decision is active given the values of the decisions before it in the walk."""
        if self.depth_conditional and not values[f"s{self.stage}.depth"] > self.position:
            return False
        return not self.type_conditional or values[f"s{self.stage}.b{self.position}.type"] == self.block_type

    def index(self, value: Any) -> int:
        """The position of ``value`` among the choices (types exact, see ``choice_index``); raises ``ArchError``
        naming the place, the rule and the value."""
        index = choice_index(self.rule, self.choices, value)
        if index is None:
            raise ArchError(Problem(self.path, self.problem(value) or ""))
        return index

    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` is one of the choices, else what is wrong (``must be one of [3, 5], got 5.0 (a
        float; this field takes integers)``): the one membership test of every arch, from any source."""
        return choice_problem(self.rule, self.choices, value)


@dataclass(frozen=True, slots=True)
class PositionDecisions:
    """The decisions of one block position: its type, then per allowed type that type's fields."""

    type: Decision
    fields: tuple[tuple[str, tuple[Decision, ...]], ...]

    def fields_of(self, type_name: str) -> tuple[Decision, ...]:
        for name, decisions in self.fields:
            if name == type_name:
                return decisions
        raise KeyError(type_name)


@dataclass(frozen=True, slots=True)
class StageDecisions:
    depth: Decision
    width: Decision
    positions: tuple[PositionDecisions, ...]


class SpaceWalk:
    """Every decision variable of ``space`` and what derives from walking them (see the module docstring).

    Build it with ``space_walk(space)``, which caches one walk per space.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.size_name = "resolution" if space.modality == "image" else "sequence_length"
        sizes = space.input_sizes
        self.size = Decision("size", self.size_name, "size", tuple(sizes), max(sizes), min(sizes))
        stages = [_stage_decisions(index, stage) for index, stage in enumerate(space.stages)]
        self.stages: tuple[StageDecisions, ...] = tuple(stages)
        ordered: list[Decision] = []
        for stage_decisions in self.stages:
            ordered += [stage_decisions.depth, stage_decisions.width]
            for position_decisions in stage_decisions.positions:
                ordered.append(position_decisions.type)
                for _, fields in position_decisions.fields:
                    ordered += fields
        ordered.append(self.size)
        self.decisions: tuple[Decision, ...] = tuple(ordered)
        self.by_name: dict[str, Decision] = {decision.name: decision for decision in self.decisions}
        self.free_decisions: tuple[Decision, ...] = tuple(decision for decision in self.decisions if decision.free)
        self.feature_names: tuple[str, ...] = tuple(f"{decision.name}={choice}" for decision in self.free_decisions for choice in decision.choices)
        offsets, offset = {}, 0
        for decision in self.free_decisions:
            offsets[decision.name] = offset
            offset += len(decision.choices)
        self._feature_offsets = offsets
        self._other_size = "sequence_length" if self.size_name == "resolution" else "resolution"
        self._fast_stages = tuple(
            (
                self._slot(stage.depth),
                self._slot(stage.width),
                tuple((self._slot(position.type), self._fields_by_class(position)) for position in stage.positions),
            )
            for stage in self.stages
        )
        self._fast_size = self._slot(self.size)

    def walk(self, choose: Choose) -> Arch:
        """The arch whose every active decision ``choose`` picks, asked in walk order (inactive ones never)."""
        stages = []
        for stage_decisions, stage in zip(self.stages, self.space.stages, strict=True):
            depth = choose(stage_decisions.depth)
            width = choose(stage_decisions.width)
            blocks = []
            for position_decisions in stage_decisions.positions[:depth]:
                type_name = choose(position_decisions.type)
                entry = stage.choices_for(type_name).entry
                values = {decision.field: choose(decision) for decision in position_decisions.fields_of(type_name)}
                blocks.append(entry.config_class(**values))
            stages.append(StageArch(width, tuple(blocks)))
        size = choose(self.size)
        if self.space.modality == "image":
            return Arch(tuple(stages), resolution=size)
        return Arch(tuple(stages), sequence_length=size)

    def values(self, arch: Arch) -> dict[str, Any]:
        """The value of every active decision of ``arch``, by name, in walk order, each the space's own choice (a
        number field's ``4.0`` is given as the choice ``4``); raises ``ArchError`` listing every place where ``arch``
        leaves the space (as ``check``)."""
        try:
            return self._values(arch)
        except ArchError:
            self.check(arch)
            raise

    def _values(self, arch: Arch) -> dict[str, Any]:
        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        if len(arch.stages) != len(self.stages):
            raise ArchError(Problem("stages", f"must list {len(self.stages)} stage(s), as the space {self.space.name!r} has, got {len(arch.stages)}"))
        other = "sequence_length" if self.size_name == "resolution" else "resolution"
        if getattr(arch, other) is not None:
            raise ArchError(Problem(other, f"must be null in an arch of the {self.space.modality} space {self.space.name!r}"))
        values: dict[str, Any] = {}

        def read(decision: Decision) -> Any:
            value = decision.choices[decision.index(self._value_in(arch, decision))]
            values[decision.name] = value
            return value

        self.walk(read)
        return values

    def _value_in(self, arch: Arch, decision: Decision) -> Any:
        if decision.kind == "size":
            return getattr(arch, self.size_name)
        stage = arch.stages[decision.stage]
        if decision.kind == "depth":
            return len(stage.blocks)
        if decision.kind == "width":
            return stage.width
        config = stage.blocks[decision.position]
        if decision.kind == "type":
            try:
                return type_of(config).name
            except TypeError as error:
                raise ArchError(Problem(decision.path, str(error))) from None
        return getattr(config, decision.field)

    def check(self, arch: Arch) -> None:
        """Raise ``ArchError`` listing every place where ``arch`` leaves the space, each with its path, the rule and
        the value (the one arch validation, ``nas.supernets.arch_input``, that data from any source goes through)."""
        from .arch_input import arch_data, arch_problems

        if not isinstance(arch, Arch):
            raise ArchError(f"expected an Arch, got {type(arch).__name__}")
        problems = arch_problems(arch_data(arch), self)
        if problems:
            raise ArchError(problems)

    def canonical(self, arch: Arch) -> Arch:
        """``arch`` (checked) rebuilt from the space's own choices: equal to it, and with the JSON, digest and short
        name of the same arch sampled from the space."""
        values = self.values(arch)
        return self.walk(lambda decision: values[decision.name])

    def params(self, arch: Arch) -> dict[str, Any]:
        """The free (more than one choice) active decisions of ``arch``: exactly what ``from_params`` needs."""
        return {name: value for name, value in self.values(arch).items() if self.by_name[name].free}

    def from_params(self, params: Mapping[str, Any]) -> Arch:
        """The arch that ``params`` (free active decisions by name, as ``params`` returns them) describe. A missing
        or unknown parameter, a parameter of an inactive decision, or a value outside the choices is an
        ``ArchError``."""
        used: set[str] = set()

        def read(decision: Decision) -> Any:
            if not decision.free:
                return decision.choices[0]
            if decision.name not in params:
                raise ArchError(f"parameter {decision.name!r} ({decision.path}) is missing; it is active when {decision.condition}")
            value = params[decision.name]
            used.add(decision.name)
            return decision.choices[decision.index(value)]

        arch = self.walk(read)
        extra = sorted(set(params) - used)
        if extra:
            known = [name for name in extra if name in self.by_name]
            if known:
                decision = self.by_name[known[0]]
                raise ArchError(f"parameter {decision.name!r} is inactive in this arch; it is active only when {decision.condition}")
            raise ArchError(f"unknown parameter(s) {extra}; parameters are {[decision.name for decision in self.free_decisions]}")
        return arch

    def choose_params(self, choose: Callable[[str, tuple[Any, ...]], Any]) -> dict[str, Any]:
        """Walk the space letting ``choose(name, choices)`` pick every free active decision; the parameters of the
        arch so chosen (the contract samplers use to walk a conditional space without knowing it)."""
        params: dict[str, Any] = {}

        def pick(decision: Decision) -> Any:
            if not decision.free:
                return decision.choices[0]
            value = decision.choices[decision.index(choose(decision.name, decision.choices))]
            params[decision.name] = value
            return value

        self.walk(pick)
        return params

    def sample(self, rng: np.random.Generator) -> Arch:
        """A random arch: each active decision uniformly among its choices, one ``rng.integers`` per decision in walk
        order (single-choice decisions included)."""
        return self.walk(lambda decision: decision.choices[rng.integers(len(decision.choices))])

    def extreme(self, largest: bool, block_type: str | None = None) -> Arch:
        """Every decision at its largest (or smallest) choice; block types are ``block_type`` where a position allows
        it, else the position's first-listed type."""

        def pick(decision: Decision) -> Any:
            if decision.kind == "type":
                return block_type if block_type in decision.choices else decision.choices[0]
            return decision.largest if largest else decision.smallest

        return self.walk(pick)

    def count(self) -> int:
        """Exact number of distinct archs (a Python int, however large)."""
        total = len(self.size.choices)
        for stage in self.stages:
            per_position = [sum(_product(len(field.choices) for field in fields) for _, fields in position.fields) for position in stage.positions]
            by_depth = sum(_product(per_position[:depth]) for depth in stage.depth.choices)
            total *= len(stage.width.choices) * by_depth
        return total

    def mutate(self, arch: Arch, rng: np.random.Generator) -> Arch:
        """``arch`` with one active free decision (drawn uniformly) moved to another of its choices (drawn uniformly);
        decisions that become active draw their value uniformly. Raises ``ArchError`` when the space has no free
        decision."""
        values = self.values(arch)
        mutable = [self.by_name[name] for name in values if self.by_name[name].free]
        if not mutable:
            raise ArchError(f"the space {self.space.name!r} has a single arch; there is nothing to mutate")
        target = mutable[int(rng.integers(len(mutable)))]
        current = target.index(values[target.name])
        others = [choice for index, choice in enumerate(target.choices) if index != current]
        replacement = others[int(rng.integers(len(others)))]

        def pick(decision: Decision) -> Any:
            if decision.name == target.name:
                return replacement
            if decision.name in values:
                return values[decision.name]
            return decision.choices[int(rng.integers(len(decision.choices)))]

        return self.walk(pick)

    def features(self, archs: Sequence[Arch] | Iterable[Arch]) -> np.ndarray:
        """The feature matrix ``[N, F]`` (float32) of ``archs``: per free decision a one-hot block over its choices,
        all zeros where the decision is inactive. Column ``k`` is named ``feature_names[k]`` (``"s0.width=24"``).
        Raises ``ArchError`` (as ``check``) for an arch outside the space."""
        archs = list(archs)
        columns: list[int] = []
        counts = np.zeros(len(archs), dtype=np.int64)
        for row, arch in enumerate(archs):
            hot = self.hot_columns(arch)
            columns += hot
            counts[row] = len(hot)
        matrix = np.zeros((len(archs), len(self.feature_names)), dtype=np.float32)
        matrix[np.repeat(np.arange(len(archs)), counts), np.asarray(columns, dtype=np.int64)] = 1.0
        return matrix

    def hot_columns(self, arch: Arch) -> list[int]:
        """The columns of ``features`` that are 1 for ``arch`` (one per free active decision, in walk order); raises
        ``ArchError`` (as ``check``) when ``arch`` leaves the space, so it is also the fast membership test.

        One dictionary look-up per decision, keyed by the value's exact type and the value (built from
        ``choice_index``, so ``4.0`` places as the number field's choice ``4`` and ``1`` never as ``True``); an arch
        the tables cannot place goes the slow way, through ``values``, which raises the full error."""
        try:
            return self._hot_columns_fast(arch)
        except (KeyError, TypeError, AttributeError):
            values = self.values(arch)
            return [self._feature_offsets[name] + self.by_name[name].index(value) for name, value in values.items() if self.by_name[name].free]

    def _hot_columns_fast(self, arch: Arch) -> list[int]:
        if type(arch) is not Arch or len(arch.stages) != len(self._fast_stages) or getattr(arch, self._other_size) is not None:
            raise KeyError("not placeable by the tables")
        hot: list[int] = []
        for (depth, width, positions), stage in zip(self._fast_stages, arch.stages, strict=True):
            blocks = stage.blocks
            index = depth[0][(int, len(blocks))]
            if depth[1] >= 0:
                hot.append(depth[1] + index)
            index = width[0][(type(stage.width), stage.width)]
            if width[1] >= 0:
                hot.append(width[1] + index)
            for (kind, by_class), config in zip(positions, blocks, strict=False):
                type_index, fields = by_class[type(config)]
                if kind[1] >= 0:
                    hot.append(kind[1] + type_index)
                for field, table, offset in fields:
                    value = getattr(config, field)
                    index = table[(type(value), value)]
                    if offset >= 0:
                        hot.append(offset + index)
        size = getattr(arch, self.size_name)
        index = self._fast_size[0][(type(size), size)]
        if self._fast_size[1] >= 0:
            hot.append(self._fast_size[1] + index)
        return hot

    def _slot(self, decision: Decision) -> tuple[dict[tuple[type, Any], int], int]:
        """``(table, offset)``: ``table[(type(value), value)]`` is the choice index of every value ``choice_index``
        places that is a choice, its float or its int; ``offset`` the decision's first feature column (-1 if not
        free)."""
        table: dict[tuple[type, Any], int] = {}
        for index, choice in enumerate(decision.choices):
            candidates = [choice]
            if isinstance(choice, int | float) and not isinstance(choice, bool):
                candidates += [float(choice)] + ([int(choice)] if float(choice).is_integer() else [])
            for value in candidates:
                if choice_index(decision.rule, decision.choices, value) == index:
                    table.setdefault((type(value), value), index)
        return table, self._feature_offsets.get(decision.name, -1)

    def _fields_by_class(self, position: PositionDecisions) -> dict[type, tuple[int, tuple[tuple[str, dict[tuple[type, Any], int], int], ...]]]:
        """Per allowed block config class: its type's choice index and, per field, ``(field, table, offset)``."""
        by_class = {}
        for type_index, type_name in enumerate(position.type.choices):
            fields = tuple((decision.field, *self._slot(decision)) for decision in position.fields_of(type_name))
            by_class[block_type(type_name).config_class] = (type_index, fields)
        return by_class

    def describe(self) -> list[dict[str, Any]]:
        """Every decision as a plain record (name, path, choices, condition), in walk order."""
        return [
            {"name": decision.name, "path": decision.path, "choices": list(decision.choices), "condition": decision.condition} for decision in self.decisions
        ]


def _stage_decisions(index: int, stage: StageSpace) -> StageDecisions:
    """The decisions of stage ``index``: depth, width, and per position up to the largest depth its type and every
    allowed type's fields."""
    depth = Decision(f"s{index}.depth", f"stages[{index}].depth", "depth", stage.depths, max(stage.depths), min(stage.depths), stage=index)
    width = Decision(f"s{index}.width", f"stages[{index}].width", "width", stage.widths, max(stage.widths), min(stage.widths), stage=index)
    types = tuple(choices.type for choices in stage.blocks)
    positions = []
    for position in range(max(stage.depths)):
        prefix, where = f"s{index}.b{position}", f"stages[{index}].blocks[{position}]"
        optional = position >= min(stage.depths)
        kind = Decision(
            f"{prefix}.type",
            f"{where}.type",
            "type",
            types,
            types[0],
            types[0],
            stage=index,
            position=position,
            depth_conditional=optional,
            rule=OptionRule(types),
        )
        per_type = []
        for choices in stage.blocks:
            rules = choices.entry.rules
            fields = tuple(
                Decision(
                    f"{prefix}.{choices.type}.{name}",
                    f"{where}.{name}",
                    "field",
                    tuple(values),
                    largest=rules[name].largest(values),
                    smallest=rules[name].smallest(values),
                    stage=index,
                    position=position,
                    block_type=choices.type,
                    field=name,
                    depth_conditional=optional,
                    type_conditional=len(types) > 1,
                    rule=rules[name],
                )
                for name, values in choices.fields
            )
            per_type.append((choices.type, fields))
        positions.append(PositionDecisions(kind, tuple(per_type)))
    return StageDecisions(depth, width, tuple(positions))


def _product(values: Iterable[int]) -> int:
    total = 1
    for value in values:
        total *= value
    return total


@functools.lru_cache(maxsize=64)
def space_walk(space: SearchSpace) -> SpaceWalk:
    """The (cached) walk of ``space``."""
    return SpaceWalk(space)


__all__ = ["Decision", "PositionDecisions", "SpaceWalk", "StageDecisions", "space_walk"]
