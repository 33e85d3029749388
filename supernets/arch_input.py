"""The one validation path of an arch, whatever it comes from.

An arch reaches nasforge as data (``--arch`` JSON or YAML, an ``arch.yaml`` file, the study's ``arch`` attribute,
ONNX ``nasforge_arch`` metadata, ``Arch.from_dict`` in Python) or as an ``Arch`` value built in Python
(``SearchSpace.check``). Both are checked here, by ``arch_problems``, with the rules and messages of a space file
(``nas.space.schema``):

* unknown keys are refused at every level (arch, stage, block), with a "did you mean";
* types are exact: ``width``, ``resolution``, ``sequence_length`` and integer fields take a real ``int`` (``12.0``
  and ``True`` are refused), boolean fields a ``bool`` (``1`` is refused), option fields a string; number fields
  (``FloatRule``) take an int or a float and match the space's choice by value;
* given a space, every value is one of the space's choices, tested by the decisions of the space's one walk
  (``nas.supernets.walk``: ``Decision.problem``);
* every problem is reported at once, each with its path (``stages[0].blocks[1].kernel_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .blocks import BLOCKS, type_of, value_kind
from .registry import did_you_mean
from .space import Arch, ArchError, Problem, SearchSpace, StageArch

if TYPE_CHECKING:
    from .walk import PositionDecisions, SpaceWalk, StageDecisions

ARCH_KEYS = ("resolution", "sequence_length", "stages")
STAGE_KEYS = ("width", "blocks")
SIZE_KEYS = ("resolution", "sequence_length")


@dataclasses.dataclass(frozen=True, slots=True)
class _Foreign:
    """A block of an ``Arch`` value whose config is not an instance of a registered block config class."""

    config: Any


def parse_arch_data(data: Any, space: SearchSpace | None = None, *, source: str = "") -> Arch:
    """The arch ``data`` describes (see ``Arch.from_dict``); raises ``ArchError`` listing every problem."""
    walk = space.walk() if space is not None else None
    problems = arch_problems(data, walk)
    if problems:
        raise ArchError(problems, source)
    stages = tuple(
        StageArch(stage["width"], tuple(BLOCKS.get(block["type"]).config_class(**{k: v for k, v in block.items() if k != "type"}) for block in stage["blocks"]))
        for stage in data["stages"]
    )
    arch = Arch(stages, data.get("resolution"), data.get("sequence_length"))
    return walk.canonical(arch) if walk is not None else arch


def arch_data(arch: Arch) -> dict[str, Any]:
    """``arch`` as the data ``arch_problems`` reads (``to_dict`` that never raises: a config of no registered block
    type is kept, marked, for ``arch_problems`` to name)."""
    stages: list[Any] = []
    for stage in arch.stages:
        if not isinstance(stage, StageArch):
            stages.append(stage)
            continue
        blocks: list[Any] = []
        for config in stage.blocks:
            try:
                entry = type_of(config)
            except TypeError:
                blocks.append(_Foreign(config))
                continue
            blocks.append({"type": entry.name, **{field.name: getattr(config, field.name) for field in dataclasses.fields(config)}})
        stages.append({"width": stage.width, "blocks": blocks})
    return {"resolution": arch.resolution, "sequence_length": arch.sequence_length, "stages": stages}


def arch_problems(data: Any, walk: SpaceWalk | None = None) -> list[Problem]:
    """Every problem of arch ``data`` (``Arch.to_dict`` form), each with its path; with ``walk`` (a space's
    ``SpaceWalk``) also every value outside the space's choices. Empty when the arch is fine."""
    if not isinstance(data, Mapping):
        return [Problem("", f"an arch must be a mapping with keys {list(ARCH_KEYS)}, got {_described(data)}")]
    problems = _unknown_keys("", data, ARCH_KEYS)
    problems += _size_problems(data, walk)
    if "stages" not in data:
        return [*problems, Problem("stages", "is required: a list of stages, each a mapping with 'width' and 'blocks'")]
    stages = data["stages"]
    if not isinstance(stages, list | tuple):
        return [*problems, Problem("stages", f"must be a list of stages, got {_described(stages)}")]
    if walk is not None and len(stages) != len(walk.stages):
        problems.append(Problem("stages", f"must list {len(walk.stages)} stage(s), as the space {walk.space.name!r} has, got {len(stages)}"))
    elif not stages:
        problems.append(Problem("stages", "must list at least one stage"))
    for index, stage in enumerate(stages):
        decisions = walk.stages[index] if walk is not None and index < len(walk.stages) else None
        problems += _stage_problems(f"stages[{index}]", stage, decisions)
    return problems


def _size_problems(data: Mapping[str, Any], walk: SpaceWalk | None) -> list[Problem]:
    problems = []
    for name in SIZE_KEYS:
        value = data.get(name)
        if value is None:
            continue
        if walk is None:
            message = _count_problem(value)
        elif name != walk.size_name:
            modality, other = walk.space.modality, "sequence" if walk.space.modality == "image" else "image"
            message = f"applies to {other} archs; the space {walk.space.name!r} is a {modality} space, its archs have {walk.size_name}"
        else:
            message = walk.size.problem(value)
        if message:
            problems.append(Problem(name, message))
    given = [name for name in SIZE_KEYS if data.get(name) is not None]
    if walk is not None:
        if walk.size_name not in given:
            problems.append(Problem(walk.size_name, f"is required: one of {list(walk.size.choices)}"))
    elif not given:
        problems.append(Problem("", "an arch needs a 'resolution' (image) or a 'sequence_length' (sequence)"))
    elif len(given) == 2:
        problems.append(Problem("sequence_length", "an arch has a resolution (image) or a sequence_length (sequence), not both"))
    return problems


def _stage_problems(where: str, stage: Any, decisions: StageDecisions | None) -> list[Problem]:
    if not isinstance(stage, Mapping):
        return [Problem(where, f"must be a mapping with keys {list(STAGE_KEYS)}, got {_described(stage)}")]
    problems = _unknown_keys(where, stage, STAGE_KEYS, notes={"depth": "an arch's stage has no depth key: its depth is the number of blocks it lists"})
    if "width" not in stage:
        problems.append(Problem(f"{where}.width", f"is required: one of {list(decisions.width.choices)}" if decisions else "is required"))
    else:
        message = decisions.width.problem(stage["width"]) if decisions is not None else _count_problem(stage["width"])
        if message:
            problems.append(Problem(f"{where}.width", message))
    if "blocks" not in stage:
        return [*problems, Problem(f"{where}.blocks", "is required: the list of the stage's blocks (its depth is their number)")]
    blocks = stage["blocks"]
    if not isinstance(blocks, list | tuple):
        return [*problems, Problem(f"{where}.blocks", f"must be a list of blocks, got {_described(blocks)}")]
    if decisions is not None:
        message = decisions.depth.problem(len(blocks))
        if message:
            problems.append(Problem(f"{where}.depth", f"{message} (the number of blocks listed)"))
    elif not blocks:
        problems.append(Problem(f"{where}.blocks", "must list at least one block"))
    for position, block in enumerate(blocks):
        position_decisions = decisions.positions[position] if decisions is not None and position < len(decisions.positions) else None
        problems += _block_problems(f"{where}.blocks[{position}]", block, position_decisions)
    return problems


def _block_problems(where: str, block: Any, decisions: PositionDecisions | None) -> list[Problem]:
    if isinstance(block, _Foreign):
        return [Problem(f"{where}.type", f"{type(block.config).__name__} is not a registered block config")]
    if not isinstance(block, Mapping):
        return [Problem(where, f"must be a mapping with a 'type' and its fields, got {_described(block)}")]
    allowed = list(decisions.type.choices) if decisions is not None else list(BLOCKS.names())
    if "type" not in block:
        return [Problem(f"{where}.type", f"is required: one of {allowed}")]
    type_name = block["type"]
    problems: list[Problem] = []
    fields = None
    if decisions is not None:
        message = decisions.type.problem(type_name)
        if message:
            problems.append(Problem(f"{where}.type", message))
        else:
            fields = {decision.field: decision for decision in decisions.fields_of(type_name)}
    if not isinstance(type_name, str) or type_name not in BLOCKS:
        if not problems:
            hint = did_you_mean(type_name, allowed) if isinstance(type_name, str) else ""
            got = repr(type_name) if isinstance(type_name, str) else _described(type_name)
            problems.append(Problem(f"{where}.type", f"must be one of {allowed}, got {got}{hint}"))
        return problems
    rules = BLOCKS.get(type_name).rules
    defaults = BLOCKS.get(type_name).defaults
    for key in block:
        if key != "type" and key not in rules:
            problems.append(Problem(f"{where}.{key}", f"unknown field of {type_name!r}; its fields: {list(rules)}{did_you_mean(key, rules)}"))
    for name, rule in rules.items():
        if name not in block and name in defaults and (fields is None or fields[name].problem(defaults[name]) is None):
            continue
        if name not in block:
            choices = f": one of {list(fields[name].choices)}" if fields is not None else f" ({rule.takes})"
            problems.append(Problem(f"{where}.{name}", f"is required{choices}"))
            continue
        message = fields[name].problem(block[name]) if fields is not None else rule.problem(block[name])
        if message:
            problems.append(Problem(f"{where}.{name}", message))
    return problems


def _unknown_keys(where: str, data: Mapping[Any, Any], allowed: tuple[str, ...], notes: Mapping[str, str] | None = None) -> list[Problem]:
    problems = []
    for key in data:
        if isinstance(key, str) and key in allowed:
            continue
        path = f"{where}.{key}" if where else str(key)
        note = (notes or {}).get(key) if isinstance(key, str) else None
        if note:
            problems.append(Problem(path, f"unknown key ({note}); allowed keys: {list(allowed)}"))
        else:
            problems.append(Problem(path, f"unknown key; allowed keys: {list(allowed)}{did_you_mean(key, allowed)}"))
    return problems


def _count_problem(value: Any) -> str | None:
    """A width or input size without a space: a positive ``int`` (not a float, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a positive integer, got {_described(value)}"
    if value < 1:
        return f"must be a positive integer, got {value}"
    return None


def _described(value: Any) -> str:
    """``a float: 8.0``, ``a list: [1, 2]``, ``null``."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{value_kind(value)}: {text if len(text) <= 60 else text[:57] + '...'}"


__all__ = ["ARCH_KEYS", "STAGE_KEYS", "arch_data", "arch_problems", "parse_arch_data"]
