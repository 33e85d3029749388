"""The block protocol: field rules, block configs, the elastic block base and the registry.

A block is declared once, in its own module:

* a frozen ``slots`` dataclass of concrete values whose fields carry a rule (``choice(IntRule(...))``); the YAML
  schema, validation, sampling, counting and the Optuna space are all generated from those fields;
* an ``ElasticBlock`` subclass holding the weights of the largest choice, with ``set_active`` and ``extract``;
* the static module that ``extract`` returns, constructible from ``(config, BlockContext)``;
* ``@register_block("lower_snake_name", ...)`` on the elastic class.
"""

from __future__ import annotations

import dataclasses
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..registry import Registry, did_you_mean

MODALITIES = ("image", "sequence")


@dataclass(frozen=True, slots=True)
class IntRule:
    """An integer in ``[minimum, maximum]``, optionally odd."""

    minimum: int
    maximum: int
    odd: bool = False

    takes: ClassVar[str] = "integers"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has this rule's type: a real ``int`` (``12.0`` and ``True`` are not)."""
        return isinstance(value, int) and not isinstance(value, bool)

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if not self.minimum <= value <= self.maximum:
            return f"must be between {self.minimum} and {self.maximum}, got {value}"
        if self.odd and value % 2 == 0:
            return f"must be odd, got {value}"
        return None

    def largest(self, values: tuple[Any, ...]) -> Any:
        return max(values)

    def smallest(self, values: tuple[Any, ...]) -> Any:
        return min(values)


@dataclass(frozen=True, slots=True)
class FloatRule:
    """A number in ``[minimum, maximum]`` (integers are accepted and kept as given)."""

    minimum: float
    maximum: float

    takes: ClassVar[str] = "numbers"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has this rule's type: an ``int`` or a ``float`` (a bool is not a number here)."""
        return isinstance(value, int | float) and not isinstance(value, bool)

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number, got {value!r}"
        if not self.minimum <= value <= self.maximum:
            return f"must be between {self.minimum} and {self.maximum}, got {value}"
        return None

    def largest(self, values: tuple[Any, ...]) -> Any:
        return max(values)

    def smallest(self, values: tuple[Any, ...]) -> Any:
        return min(values)


@dataclass(frozen=True, slots=True)
class OptionRule:
    """One of a fixed set of names; the first listed choice counts as both largest and smallest."""

    values: tuple[str, ...]

    takes: ClassVar[str] = "names (strings)"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has this rule's type: a ``str``."""
        return isinstance(value, str)

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value in self.values:
            return None
        return f"must be one of {list(self.values)}, got {value!r}{did_you_mean(value, self.values)}"

    def largest(self, values: tuple[Any, ...]) -> Any:
        return values[0]

    def smallest(self, values: tuple[Any, ...]) -> Any:
        return values[0]


@dataclass(frozen=True, slots=True)
class BoolRule:
    """``true`` or ``false``; ``true`` counts as the larger choice."""

    takes: ClassVar[str] = "true or false"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has this rule's type: a ``bool`` (``1`` and ``0`` are not)."""
        return isinstance(value, bool)

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"

    def largest(self, values: tuple[Any, ...]) -> Any:
        return max(values)

    def smallest(self, values: tuple[Any, ...]) -> Any:
        return min(values)


Rule = IntRule | FloatRule | OptionRule | BoolRule


def value_kind(value: Any) -> str:
    """The kind of ``value`` in the words of JSON and YAML (``"a float"``, ``"a boolean"``, ``"a string"``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def choice_index(rule: Rule, choices: tuple[Any, ...], value: Any) -> int | None:
    """The position of ``value`` among ``choices`` (the values a space allows for a field of ``rule``), or ``None``.

    Types are exact: ``value`` must have the rule's type (an integer field refuses ``5.0``, a boolean field ``1``);
    a number field (``FloatRule``) takes an int or a float and matches a choice by value (``4.0`` is the choice ``4``).
    """
    if not rule.accepts(value):
        return None
    for index, allowed in enumerate(choices):
        if rule.accepts(allowed) and allowed == value:
            return index
    return None


def choice_problem(rule: Rule, choices: tuple[Any, ...], value: Any) -> str | None:
    """``None`` when ``value`` is one of ``choices`` (see ``choice_index``), else the rule, the value and, when the type
    is wrong, what the field takes: ``must be one of [3, 5], got 5.0 (a float; this field takes integers)``."""
    if choice_index(rule, choices, value) is not None:
        return None
    allowed = list(choices)
    if not rule.accepts(value):
        return f"must be one of {allowed}, got {_short(value)} ({value_kind(value)}; this field takes {rule.takes})"
    hint = did_you_mean(value, [choice for choice in choices if isinstance(choice, str)]) if isinstance(value, str) else ""
    return f"must be one of {allowed}, got {_short(value)}{hint}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


SHRINK_KINDS = ("kernel", "width", "switch")
"""How a field shrinks, which decides when progressive shrinking (Once-for-All) unlocks it:

* ``kernel``: a kernel-like size (a depthwise kernel, a band length), unlocked first, through the kernel transforms;
* ``width``: a width-like size (expand ratio, heads, key or hidden width), unlocked last, in two steps, after the
  channels are reordered by importance;
* ``switch``: a discrete choice with no size order (an activation, a gate on/off, an FFN kind), unlocked with the
  last width step.
"""


def default_shrink(rule: Rule) -> str:
    """The shrink kind of a field that does not declare one: ``width`` for numbers, ``switch`` otherwise."""
    return "width" if isinstance(rule, IntRule | FloatRule) else "switch"


def choice(rule: Rule, description: str, *, shrinks: str | None = None, default: Any = dataclasses.MISSING) -> Any:
    """Declare a config field searchable under ``rule``. ``shrinks`` is one of ``SHRINK_KINDS`` (when training
    with progressive shrinking unlocks it); by default ``default_shrink(rule)``.

    ``default``: the value of a field that a space file or an arch may leave out. This is how a block gains a field
    without breaking what was written before it: a space file without the field has the single choice ``default``,
    an arch without it has the value ``default``, and an arch at the default is written without it (``Arch.to_dict``)
    so its JSON, digest and short name stay what they were; a space whose only choice is the default keeps its repr,
    and with it the digest that hardware profiles store. Fields with a default come after those without."""
    kind = default_shrink(rule) if shrinks is None else shrinks
    if kind not in SHRINK_KINDS:
        raise ValueError(f"choice(shrinks=...) must be one of {list(SHRINK_KINDS)}, got {kind!r}{did_you_mean(str(kind), SHRINK_KINDS)}")
    metadata = {"rule": rule, "description": description, "shrinks": kind}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    problem = rule.problem(default)
    if problem is not None:
        raise ValueError(f"choice(default=...) {problem}")
    return dataclasses.field(default=default, metadata=metadata)


def field_rules(config_class: type) -> dict[str, Rule]:
    """The rule of every field of a block config class, in declaration order."""
    return {field.name: field.metadata["rule"] for field in dataclasses.fields(config_class)}


def field_defaults(config_class: type) -> dict[str, Any]:
    """The default of every field of a block config class that has one (see ``choice(default=...)``)."""
    return {field.name: field.default for field in dataclasses.fields(config_class) if field.default is not dataclasses.MISSING}


def without_defaults(config: Any) -> dict[str, Any]:
    """The fields of a block config as a dict, less those at their default (how archs are written)."""
    defaults = field_defaults(type(config))
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return {name: value for name, value in values.items() if name not in defaults or not _same_value(value, defaults[name])}


def _same_value(value: Any, default: Any) -> bool:
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def field_shrinks(config_class: type) -> dict[str, str]:
    """The shrink kind (see ``SHRINK_KINDS``) of every field of a block config class, in declaration order."""
    return {field.name: field.metadata.get("shrinks") or default_shrink(field.metadata["rule"]) for field in dataclasses.fields(config_class)}


@dataclass(frozen=True, slots=True)
class BlockContext:
    """Where a block sits. For an elastic block the channel counts are the largest; for a static one, exact."""

    modality: str
    in_channels: int
    out_channels: int
    stride: int = 1
    causal: bool = False


@dataclass(frozen=True, slots=True)
class BlockType:
    """A registered block: its YAML name, config, elastic and static classes, and what it supports."""

    name: str
    config_class: type
    elastic_class: type[ElasticBlock]
    static_class: type[nn.Module]
    modalities: frozenset[str]
    reshapes: bool

    @property
    def rules(self) -> dict[str, Rule]:
        return field_rules(self.config_class)

    @property
    def shrinks(self) -> dict[str, str]:
        """Each field's shrink kind (``kernel``, ``width`` or ``switch``)."""
        return field_shrinks(self.config_class)

    @property
    def defaults(self) -> dict[str, Any]:
        """The fields a space file or an arch may leave out, with their values then."""
        return field_defaults(self.config_class)


BLOCKS: Registry[BlockType] = Registry("block type", discover="nas.supernets.blocks")
"""Every block type by its YAML name. Each module of ``nas.supernets.blocks`` is imported on first look-up, so a new
block file registers itself with no list to edit."""


def register_block(name: str, *, config: type, static: type[nn.Module], modalities: tuple[str, ...], reshapes: bool) -> Any:
    """Class decorator registering an ``ElasticBlock`` under ``name`` (used as ``type: name`` in YAML).

    ``reshapes``: the block can change width and apply the stage stride itself (MBConv). Blocks that cannot
    (attention, GLA) get a stage-entry projection from the supernet.
    """

    def decorate(elastic_class: type[ElasticBlock]) -> type[ElasticBlock]:
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"block {name!r}: unknown modalities {sorted(unknown)}")
        BLOCKS.register(name, BlockType(name, config, elastic_class, static, frozenset(modalities), reshapes), source=elastic_class.__module__)
        elastic_class.block_type = name
        return elastic_class

    return decorate


def block_type(name: str) -> BlockType:
    """The registered block called ``name``; unknown names raise ``UnknownNameError`` (a ``KeyError``) with a
    "did you mean"."""
    return BLOCKS.get(name)


def type_of(config: Any) -> BlockType:
    """The registered block whose config class ``config`` is an instance of."""
    for _, entry in BLOCKS.items():
        if type(config) is entry.config_class:
            return entry
    raise TypeError(f"{type(config).__name__} is not a registered block config")


@dataclass(frozen=True, slots=True)
class BlockChoices:
    """The choices of one block type at one position: ``fields`` maps each config field to its allowed values."""

    type: str
    fields: tuple[tuple[str, tuple[Any, ...]], ...]

    @classmethod
    def build(cls, type_name: str, fields: Mapping[str, tuple[Any, ...]]) -> BlockChoices:
        """The choices of ``type_name`` from ``fields`` (field name -> its values); a field with a default may be
        left out (its single choice is then the default)."""
        entry = block_type(type_name)
        defaults = entry.defaults
        return cls(type_name, tuple((name, tuple(fields[name]) if name in fields or name not in defaults else (defaults[name],)) for name in entry.rules))

    def __repr__(self) -> str:
        """The dataclass repr, less the fields whose only choice is their default: a field added to a block later
        leaves the repr (and the digest of every space, which hardware profiles store) as it was."""
        defaults = block_type(self.type).defaults
        kept = tuple((name, values) for name, values in self.fields if not (name in defaults and len(values) == 1 and _same_value(values[0], defaults[name])))
        return f"BlockChoices(type={self.type!r}, fields={kept!r})"

    def __getitem__(self, name: str) -> tuple[Any, ...]:
        for field_name, values in self.fields:
            if field_name == name:
                return values
        raise KeyError(name)

    @property
    def entry(self) -> BlockType:
        return block_type(self.type)

    def count(self) -> int:
        total = 1
        for _, values in self.fields:
            total *= len(values)
        return total

    def configs(self) -> Iterator[Any]:
        """Every config these choices allow."""
        names = [name for name, _ in self.fields]
        for values in itertools.product(*(values for _, values in self.fields)):
            yield self.entry.config_class(**dict(zip(names, values, strict=True)))

    def largest(self) -> Any:
        rules = self.entry.rules
        return self.entry.config_class(**{name: rules[name].largest(values) for name, values in self.fields})

    def smallest(self) -> Any:
        rules = self.entry.rules
        return self.entry.config_class(**{name: rules[name].smallest(values) for name, values in self.fields})

    def sample(self, rng: np.random.Generator) -> Any:
        return self.entry.config_class(**{name: values[rng.integers(len(values))] for name, values in self.fields})

    def check(self, config: Any) -> None:
        """Raise ``ValueError`` naming the first field of ``config`` outside these choices."""
        if type(config) is not self.entry.config_class:
            raise ValueError(f"expected a {self.entry.config_class.__name__}, got {type(config).__name__}")
        rules = self.entry.rules
        for name, values in self.fields:
            problem = choice_problem(rules[name], values, getattr(config, name))
            if problem is not None:
                raise ValueError(f"{self.type}.{name} {problem}")


class ElasticBlock(nn.Module, ABC):
    """Base of every elastic block: weights of the largest choice, one active config at a time.

    Subclasses build their weights in ``__init__`` from ``context`` (largest channel counts) and ``choices``
    (largest value of each field), and implement ``forward`` and ``extract`` for ``self.config``.
    """

    block_type: ClassVar[str]

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__()
        self.context = context
        self.choices = choices
        self.config: Any = choices.largest()
        self.in_channels = context.in_channels
        self.out_channels = context.out_channels

    def set_active(self, config: Any, in_channels: int, out_channels: int) -> None:
        """Activate ``config`` with the given widths; raises ``ValueError`` on a value outside the choices, or on
        unequal widths for a block registered with ``reshapes=False`` (it keeps its width)."""
        if not BLOCKS.get(self.block_type).reshapes and in_channels != out_channels:
            raise ValueError(f"{self.block_type} keeps its width: in_channels must equal out_channels, got {in_channels} and {out_channels}")
        self.choices.check(config)
        for name, value, largest in (
            ("in_channels", in_channels, self.context.in_channels),
            ("out_channels", out_channels, self.context.out_channels),
        ):
            if not 1 <= value <= largest:
                raise ValueError(f"{self.block_type}.{name} must be between 1 and {largest}, got {value}")
        self.config = config
        self.in_channels = in_channels
        self.out_channels = out_channels

    @property
    def static_context(self) -> BlockContext:
        """The exact context of the active choice."""
        return dataclasses.replace(self.context, in_channels=self.in_channels, out_channels=self.out_channels)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride];
        sequence: [B, L, in_channels] -> [B, L, out_channels]."""

    @abstractmethod
    def extract(self) -> nn.Module:
        """A static module equal to the active choice in eval mode, sharing no storage with this block."""

    def reorder_channels(self) -> None:
        """Permute the block's inner channels (hidden units, heads, per-head dims) so that the most important (by
        L1 norm, as Once-for-All does before shrinking widths) come first, leaving the function of the block at its
        largest choice unchanged; every smaller width then keeps the most important ones. Called under
        ``torch.no_grad`` by strategies that shrink widths. By default nothing is reordered."""

    def build_static(self, layers: Mapping[str, nn.Module]) -> nn.Module:
        """A fresh static twin of the active choice loaded (strictly) from exported ``layers``, keyed by the
        static module's submodule names; helper for ``extract``."""
        static = BLOCKS.get(self.block_type).static_class(self.config, self.static_context)
        state = {f"{name}.{key}": value for name, layer in layers.items() for key, value in layer.state_dict().items()}
        static.load_state_dict(state, strict=True)
        return static.train(self.training)
