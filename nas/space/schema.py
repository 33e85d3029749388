"""The search-space file: YAML in, every mistake reported at once, frozen values out.

``load_config(path_or_name)`` returns a ``RunConfig`` (the ``SearchSpace`` plus task and training settings) or
raises ``ConfigError`` whose ``problems`` list every broken rule with its YAML path, the value and what is
allowed. Structure is checked by pydantic (unknown keys rejected, with a "did you mean"); block fields are
checked against the rules declared on each block's config dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import re
import typing
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, TypeAdapter, ValidationError

from nas.data.registry import DATASETS
from nas.latency.targets import TARGETS
from nas.search.samplers import SAMPLERS
from nas.supernets.blocks import BLOCKS, BlockChoices
from nas.supernets.layers import ACTIVATIONS
from nas.supernets.registry import closest, did_you_mean
from nas.supernets.space import HeadSpec, Problem, SearchSpace, StageSpace, StemSpec, format_problems
from nas.supernets.strategies import STRATEGIES, StrategyOptions

OPTIMIZERS = ("adamw", "sgd")
MAX_FILE_BYTES = 1_000_000
MAX_VALUES = 100_000
MAX_NESTING = 32
MAX_COUNT_DIGITS = 1_000

PositiveInt = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
DepthInt = Annotated[StrictInt, Field(ge=1, le=64)]
WidthInt = Annotated[StrictInt, Field(ge=1, le=16384)]
Number = StrictInt | StrictFloat


class ConfigError(ValueError):
    """A search-space file that breaks one or more rules; ``problems`` lists all of them (``Problem`` is the one
    shared with ``ArchError``, so a space file and an arch report a broken rule the same way)."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(format_problems(source, problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskModel(_Strict):
    """The task: which data, its input shape (C, H, W or L) and number of classes; dataset-specific options."""

    dataset: str
    input_shape: Annotated[tuple[PositiveInt, ...], Field(min_length=1, max_length=8)]
    num_classes: Annotated[StrictInt, Field(ge=2, le=1_000_000)]
    path: str | None = None
    val_fraction: Annotated[Number, Field(gt=0, lt=1)] = 0.1
    test_fraction: Annotated[Number, Field(gt=0, lt=1)] = 0.1
    vocab_size: Annotated[StrictInt, Field(ge=4, le=1_000_000)] | None = None
    num_kv_pairs: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = None
    num_train: Annotated[StrictInt, Field(ge=1, le=10_000_000)] = 20_000
    num_val: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 1_000
    num_test: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 1_000

    @property
    def modality(self) -> str:
        """``"image"`` or ``"sequence"``, as registered for ``dataset`` in ``DATASETS``."""
        return DATASETS.get(self.dataset).modality


class StemModel(_Strict):
    channels: Annotated[StrictInt, Field(ge=1, le=8192)]
    kernel_size: Annotated[StrictInt, Field(ge=1, le=11)] = 3
    stride: Annotated[StrictInt, Field(ge=1, le=4)] = 2
    activation: str = "relu"


class HeadModel(_Strict):
    channels: tuple[Annotated[StrictInt, Field(ge=1, le=16384)], ...] = ()
    features: Annotated[StrictInt, Field(ge=1, le=16384)] | None = None
    features_bias: StrictBool = True
    dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    activation: str = "relu"


class StageModel(_Strict):
    depth: DepthInt | Annotated[list[DepthInt], Field(min_length=1)]
    width: WidthInt | Annotated[list[WidthInt], Field(min_length=1)]
    stride: Annotated[StrictInt, Field(ge=1, le=4)] = 1
    blocks: list[dict[str, Any]] = Field(min_length=1)


class TrainingModel(BaseModel):
    """The training settings every strategy shares. Every other key of ``training:`` is an option of the chosen
    strategy: ``_check_training`` validates them with the strategy's own options model (unknown keys rejected,
    with their YAML path) and ``strategy_options`` returns them typed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    strategy: str = "sandwich"
    epochs: Annotated[StrictInt, Field(ge=1, le=100_000)] = 10
    batch_size: Annotated[StrictInt, Field(ge=1, le=65_536)] = 64
    optimizer: str = "adamw"
    lr: Annotated[Number, Field(gt=0, le=10)] = 0.003
    weight_decay: Annotated[Number, Field(ge=0, le=1)] = 0.01
    warmup_epochs: Annotated[StrictInt, Field(ge=0, le=1000)] = 1
    label_smoothing: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    calibration_batches: Annotated[StrictInt, Field(ge=1, le=10_000)] = 8
    augment: StrictBool = True
    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] = 0

    def strategy_options(self) -> StrategyOptions:
        """The options of ``strategy`` (the keys beyond the common ones), validated by its ``options_type``."""
        return STRATEGIES.get(self.strategy).options_type.model_validate(self.model_extra or {})


class ConstraintsModel(_Strict):
    """Hard limits a front member must meet; they reach the sampler through Optuna's constraints function."""

    latency_ms: dict[str, Annotated[Number, Field(gt=0, le=1e7)]] = Field(default_factory=dict)
    params: Annotated[StrictInt, Field(ge=1, le=10**13)] | None = None
    macs: Annotated[StrictInt, Field(ge=1, le=10**16)] | None = None


class SearchModel(_Strict):
    """The accuracy-latency search (``nas run``): budget, sampler, latency targets, measurement, constraints."""

    trials: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 40
    sampler: str = "nsga2"
    population_size: Annotated[StrictInt, Field(ge=2, le=10_000)] = 16
    targets: Annotated[list[str], Field(min_length=1, max_length=4)] = ["cpu_fp32", "cpu_int8"]
    threads: Annotated[StrictInt, Field(ge=1, le=1024)] = 1
    batch_size: Annotated[StrictInt, Field(ge=1, le=65_536)] = 1
    measure_seconds: Annotated[Number, Field(gt=0, le=3600)] = 2.0
    latency: Literal["measured", "predicted"] = "measured"
    profiles: dict[str, Annotated[str, Field(min_length=1, max_length=4096)]] = {}
    constraints: ConstraintsModel = ConstraintsModel()
    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] = 0


class SpaceModel(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")]
    plugins: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(max_length=64)] = []
    task: TaskModel
    stem: StemModel
    stages: list[StageModel] = Field(min_length=1, max_length=64)
    head: HeadModel = HeadModel()
    resolution: PositiveInt | Annotated[list[PositiveInt], Field(min_length=1)] | None = None
    sequence_length: PositiveInt | Annotated[list[PositiveInt], Field(min_length=1)] | None = None
    training: TrainingModel = TrainingModel()
    search: SearchModel = SearchModel()


@dataclass(frozen=True, slots=True)
class RunConfig:
    space: SearchSpace
    task: TaskModel
    training: TrainingModel
    search: SearchModel
    source: str
    text: str
    base_dir: Path | None = None
    plugins: tuple[str, ...] = ()


def builtin_spaces() -> dict[str, Path]:
    """Built-in search spaces by name (shipped inside the wheel as ``nas.search_spaces``)."""
    folder = importlib.resources.files("nas.search_spaces")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_space(name_or_path: str | Path) -> Path:
    """A path to an existing file, or the file of a built-in space called ``name_or_path``."""
    path = Path(name_or_path)
    try:
        if path.is_file():
            return path
        is_directory = path.is_dir()
    except (OSError, ValueError) as error:
        raise ConfigError(str(name_or_path), [Problem("", f"not a usable file name: {getattr(error, 'strerror', None) or error}")]) from None
    if is_directory:
        raise ConfigError(str(name_or_path), [Problem("", "is a directory; give the path of a search-space YAML file or a built-in space name")])
    spaces = builtin_spaces()
    if str(name_or_path) in spaces:
        return spaces[str(name_or_path)]
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        raise ConfigError(str(name_or_path), [Problem("", f"no such file: {name_or_path}")])
    suffix = did_you_mean(name_or_path, spaces)
    raise ConfigError(str(name_or_path), [Problem("", f"not a file and not a built-in space; built-in spaces: {sorted(spaces)}{suffix}")])


def load_config(name_or_path: str | Path) -> RunConfig:
    """Read, parse and validate a search-space file (or built-in name); raises ``ConfigError``."""
    path = resolve_space(name_or_path)
    source = str(name_or_path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(source, [Problem("", f"file is larger than {MAX_FILE_BYTES:,} bytes; a search space is a short YAML file")])
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(source, [Problem("", f"file is not UTF-8 text (byte {error.start}; is it a binary file?)")]) from None
    except OSError as error:
        raise ConfigError(source, [Problem("", f"cannot read file: {error.strerror or error}")]) from None
    return parse_config(text, source, base_dir=path.resolve().parent)


def parse_config(text: str, source: str = "<string>", *, base_dir: Path | None = None, check_constraints: bool = True) -> RunConfig:
    """Validate YAML ``text``; raises ``ConfigError`` listing every problem.

    ``search.constraints.params`` / ``macs`` below the space's smallest subnet are refused (no subnet could meet
    them); that takes the space's exact minimum (``space_minimum``, seconds on a large space, only when such a
    constraint is set). ``check_constraints=False`` skips it when re-reading the config of a run that was validated
    when it started.

    ``plugins`` named in the text are imported first (file plugins relative to ``base_dir``, default the current
    folder), so the blocks, data sets, strategies, samplers and targets they register validate like built-in ones.
    """
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(source, [Problem("", f"text is longer than {MAX_FILE_BYTES:,} characters; a search space is a short YAML file")])
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as error:
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        code = error.character if isinstance(error.character, int) else ord(str(error.character)[:1] or "\0")
        raise ConfigError(
            source, [Problem("", f"invalid YAML: line {line}, column {column}: character U+{code:04X} is not allowed in YAML text (is it a binary file?)")]
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(source, [Problem("", f"invalid YAML: {where}{problem}")]) from None
    except RecursionError:
        raise ConfigError(source, [Problem("", "invalid YAML: nested too deeply")]) from None
    except (ValueError, OverflowError) as error:
        raise ConfigError(source, [Problem("", f"invalid YAML: {error}")]) from None
    if data is None:
        raise ConfigError(source, [Problem("", f"file is empty (or only comments); a search space is a mapping with keys {sorted(SpaceModel.model_fields)}")])
    too_big = _size_problem(data)
    if too_big:
        raise ConfigError(source, [Problem("", too_big)])
    if not isinstance(data, dict):
        kind = {"list": "a list", "str": "a string", "int": "a number", "float": "a number", "bool": "a boolean"}.get(type(data).__name__, type(data).__name__)
        raise ConfigError(source, [Problem("", f"top level must be a mapping with keys {sorted(SpaceModel.model_fields)}, got {kind}: {_short(data)}")])
    problems: list[Problem] = _import_plugins(data, source, base_dir)
    try:
        model = SpaceModel.model_validate(data)
    except ValidationError as error:
        problems += _pydantic_problems(data, error.errors())
        model = None
    problems += _check_blocks(data)
    problems += _check_semantics(data)
    problems += _check_targets(data)
    if problems:
        raise ConfigError(source, _ordered(_unique(problems)))
    assert model is not None
    config = dataclasses.replace(_build(model, source, text), base_dir=base_dir, plugins=tuple(model.plugins))
    count = config.space.count()
    if count >= 10**MAX_COUNT_DIGITS:
        raise ConfigError(
            source,
            [
                Problem(
                    "",
                    f"the space has about 10^{int(count.bit_length() * math.log10(2))} subnets, more than the limit of "
                    f"10^{MAX_COUNT_DIGITS}; use fewer stages, depths or choices",
                )
            ],
        )
    strategy = STRATEGIES.get(config.training.strategy)
    strategy_problems = [
        Problem(f"training.{key}", message)
        for key, message in strategy.check_space(config.training.strategy_options(), config.space, epochs=config.training.epochs)
    ]
    if strategy_problems:
        raise ConfigError(source, strategy_problems)
    constraint_problems = _check_constraints(config.space, config.search) if check_constraints else []
    if constraint_problems:
        raise ConfigError(source, constraint_problems)
    return config


def _check_constraints(space: SearchSpace, search: SearchModel) -> list[Problem]:
    """``search.constraints.params`` and ``macs`` that no subnet of ``space`` can meet (below its smallest subnet)."""
    from nas.supernets.costs import space_minimum

    problems = []
    constraints = search.constraints
    for key, limit, unit in (("params", constraints.params, "parameters"), ("macs", constraints.macs, "MACs (batch 1)")):
        if limit is None:
            continue
        minimum = space_minimum(space, key)
        if limit < minimum:
            problems.append(
                Problem(f"search.constraints.{key}", f"{limit:,} is below the smallest subnet's {minimum:,} {unit}: no subnet of the space can meet it")
            )
    return problems


def _import_plugins(data: dict[str, Any], source: str, base_dir: Path | None) -> list[Problem]:
    """Import the plugins the file names (before anything that reads a registry is validated)."""
    names = data.get("plugins", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        return []
    from nas.plugins import load_plugins

    return [Problem(f"plugins[{index}]", message) for index, message in load_plugins(names, base_dir, named_in=source)]


def _size_problem(data: Any) -> str | None:
    """Bound the parsed document: YAML aliases can expand a short file into an exponential (or cyclic) tree."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    values = 0
    characters = 0
    while stack:
        node, depth = stack.pop()
        values += 1
        characters += len(node) if isinstance(node, str | bytes) else 0
        if values > MAX_VALUES or characters > 2 * MAX_FILE_BYTES:
            return (
                f"the document has more than {MAX_VALUES:,} values or {2 * MAX_FILE_BYTES:,} characters once YAML aliases are expanded; "
                "a search space is a short file"
            )
        if depth > MAX_NESTING:
            return f"the document is nested more than {MAX_NESTING} levels deep (or an alias refers to itself)"
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list | tuple | set):
            stack.extend((value, depth + 1) for value in node)
    return None


def _unique(problems: list[Problem]) -> list[Problem]:
    seen: dict[tuple[str, str], Problem] = {}
    for problem in problems:
        seen.setdefault((problem.path, problem.message), problem)
    return list(seen.values())


_TOP_LEVEL_ORDER = tuple(SpaceModel.model_fields)


def _ordered(problems: list[Problem]) -> list[Problem]:
    """File-level problems and unknown top-level keys first, then sections in schema order, then by index."""

    def key(problem: Problem) -> tuple[int, tuple[int, ...]]:
        top = re.split(r"[.\[]", problem.path, maxsplit=1)[0]
        rank = _TOP_LEVEL_ORDER.index(top) if top in _TOP_LEVEL_ORDER else -1
        return rank, tuple(int(index) for index in re.findall(r"\[(\d+)\]", problem.path))

    return sorted(problems, key=key)


def format_path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _locate(data: Any, item: dict[str, Any]) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """Split a pydantic error location into the path in the user's data and, inside a union, the union's path.

    Parts that do not lead into the data are pydantic's union-member tags (``constrained-int``,
    ``list[constrained-int]``, ``[key]``), except the last part of a ``missing`` error, which names the key.
    """
    node = data
    path: list[Any] = []
    union: tuple[Any, ...] | None = None
    loc = item["loc"]
    for position, part in enumerate(loc):
        if isinstance(node, dict) and isinstance(part, Hashable) and part in node:
            path.append(part if isinstance(part, str) else repr(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif position == len(loc) - 1 and item["type"] == "missing":
            path.append(part)
        elif union is None:
            union = tuple(path)
    return tuple(path), union


def _message(item: dict[str, Any]) -> str:
    text = item["msg"]
    text = re.sub(r"^Input should be ", "must be ", text)
    text = re.sub(r"a valid dictionary or instance of \w+", "a mapping of keys to values", text)
    return text[:1].lower() + text[1:]


def _pydantic_problems(data: dict[str, Any], errors: list[dict[str, Any]], root: type[BaseModel] = SpaceModel, skip: int = 0) -> list[Problem]:
    """One problem per broken rule. Within a union (``3`` or ``[3, 5]``), the members whose type does not even
    match the input are dropped; when no member matches, one problem lists what is expected. ``root`` is the model
    validated, at the path's element ``skip`` (a strategy's options model validates ``training:`` from element 1)."""
    problems: list[Problem] = []
    unions: dict[tuple[Any, ...], list[tuple[dict[str, Any], tuple[Any, ...]]]] = {}
    for item in errors:
        path, union = _locate(data, item)
        if union is None:
            problems.append(_pydantic_problem(path, item, root, skip))
        else:
            unions.setdefault(union, []).append((item, path))
    for union, members in unions.items():
        specific = [(item, path) for item, path in members if not (path == union and item["type"].endswith("_type"))]
        if specific:
            problems += [_pydantic_problem(path, item, root, skip) for item, path in specific]
            continue
        expected: list[str] = []
        for item, _ in members:
            wanted = _message(item).removeprefix("must be ").replace("a valid list", "a list of choices")
            if wanted not in expected:
                expected.append(wanted)
        if "a valid number" in expected and "a valid integer" in expected:
            expected.remove("a valid integer")
        problems.append(Problem(format_path(union), f"must be {' or '.join(expected)}, got {_short(members[0][0].get('input'))}"))
    return problems


def _model_at(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` below ``root`` (field names; list indices pass
    through to the item type), or None where no single model does."""
    current: Any = root
    for step in loc:
        if isinstance(step, int):
            continue
        models = _models_in(current)
        if len(models) != 1 or step not in models[0].model_fields:
            return None
        current = models[0].model_fields[step].annotation
    models = _models_in(current)
    return models[0] if len(models) == 1 else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    return [candidate for candidate in _annotation_types(annotation) if isinstance(candidate, type) and issubclass(candidate, BaseModel)]


def _annotation_types(annotation: Any) -> list[Any]:
    """Every type an annotation can hold (through ``X | Y``, ``Optional``, ``Annotated``, ``list[X]``, ``dict[K, X]``)."""
    arguments = typing.get_args(annotation)
    if not arguments:
        return [annotation]
    found: list[Any] = []
    for argument in arguments:
        found += _annotation_types(argument)
    return found


def _pydantic_problem(loc: tuple[Any, ...], item: dict[str, Any], root: type[BaseModel] = SpaceModel, skip: int = 0) -> Problem:
    path = format_path(loc)
    kind = item["type"]
    if kind == "extra_forbidden":
        section = _model_at(root, loc[skip:-1])
        if section is None:
            return Problem(path, f"unknown key{did_you_mean(loc[-1], [])}")
        allowed = sorted(section.model_fields)
        return Problem(path, f"unknown key; allowed keys: {allowed}{did_you_mean(loc[-1], allowed)}")
    if kind == "missing":
        return Problem(path, "is required")
    hint = ""
    if kind == "literal_error" and isinstance(item.get("input"), str):
        hint = did_you_mean(item["input"], re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", ""))))
    return Problem(path, f"{_message(item)}, got {_short(item.get('input'))}{hint}")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _choice_key(value: Any) -> Any:
    """Equal choices compare equal (``2`` and ``2.0``) but ``true`` is not ``1``."""
    if isinstance(value, bool) or not isinstance(value, Hashable):
        return (type(value).__name__, repr(value))
    return value


def _modality(data: dict[str, Any]) -> str | None:
    """The task's modality, from task.dataset or, for a misspelled dataset, its closest match; ``None`` if unknown."""
    task = data.get("task")
    dataset = task.get("dataset") if isinstance(task, dict) else None
    if not isinstance(dataset, str):
        return None
    if dataset not in DATASETS:
        match = closest(dataset, DATASETS.names())
        if match is None:
            return None
        dataset = match
    return DATASETS.get(dataset).modality


def _check_blocks(data: dict[str, Any]) -> list[Problem]:
    """Block entries: known type, allowed for the modality, every field present with valid, distinct choices."""
    problems: list[Problem] = []
    stages = data.get("stages")
    if not isinstance(stages, list):
        return problems
    modality = _modality(data)
    for stage_index, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("blocks"), list):
            continue
        seen_types: set[str] = set()
        for block_index, block in enumerate(stage["blocks"]):
            where = f"stages[{stage_index}].blocks[{block_index}]"
            if not isinstance(block, dict):
                problems.append(Problem(where, f"must be a mapping with a 'type' and its fields, got {_short(block)}"))
                continue
            type_name = block.get("type")
            if not isinstance(type_name, str) or type_name not in BLOCKS:
                suffix = did_you_mean(type_name, BLOCKS.names()) if isinstance(type_name, str) else ""
                message = "is required" if "type" not in block else f"must be one of {list(BLOCKS.names())}, got {_short(type_name)}{suffix}"
                problems.append(Problem(f"{where}.type", message))
                continue
            entry = BLOCKS.get(type_name)
            if type_name in seen_types:
                problems.append(Problem(f"{where}.type", f"{type_name!r} is listed twice in this stage; merge its choices"))
            seen_types.add(type_name)
            if modality is not None and modality not in entry.modalities:
                problems.append(
                    Problem(
                        f"{where}.type",
                        f"{type_name!r} works on {sorted(entry.modalities)} inputs, "
                        f"but task.dataset is {'an image' if modality == 'image' else 'a sequence'} dataset",
                    )
                )
            rules = entry.rules
            for key in block:
                if key != "type" and key not in rules:
                    problems.append(Problem(f"{where}.{key}", f"unknown field of {type_name!r}; its fields: {list(rules)}{did_you_mean(key, rules)}"))
            for name, rule in rules.items():
                if name not in block and name in entry.defaults:
                    continue
                if name not in block:
                    problems.append(Problem(f"{where}.{name}", f"is required ({type(rule).__name__.removesuffix('Rule').lower()} choices)"))
                    continue
                values = _as_list(block[name])
                if not values:
                    problems.append(Problem(f"{where}.{name}", "must list at least one choice"))
                for value_index, value in enumerate(values):
                    message = rule.problem(value)
                    if message:
                        suffix = f"[{value_index}]" if isinstance(block[name], list) else ""
                        problems.append(Problem(f"{where}.{name}{suffix}", message))
                if len({_choice_key(value) for value in values}) != len(values):
                    problems.append(Problem(f"{where}.{name}", f"choices must be distinct, got {_short(values)}"))
    return problems


_INVALID: Any = object()


@functools.cache
def _field_adapter(model_class: type[BaseModel], name: str) -> TypeAdapter[Any]:
    info = model_class.model_fields[name]
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(annotation)


def _field(model_class: type[BaseModel], raw: Any, name: str) -> Any:
    """The validated value of field ``name`` of a section given as ``raw`` data (its default when absent), or
    ``_INVALID`` when the section or the field is broken (pydantic reports why). Lets the cross-field rules run
    on every part that is valid, so that one run reports every problem."""
    if not isinstance(raw, dict):
        return _INVALID
    info = model_class.model_fields[name]
    if name not in raw:
        return _INVALID if info.is_required() else info.get_default(call_default_factory=True)
    try:
        return _field_adapter(model_class, name).validate_python(raw[name])
    except ValidationError:
        return _INVALID


def _section(data: dict[str, Any], name: str) -> Any:
    """Raw data of an optional section: absent means all defaults."""
    return data.get(name, {}) if name in ("head", "training") else data.get(name)


def _check_targets(data: dict[str, Any]) -> list[Problem]:
    """``search.sampler`` names a registered sampler, ``search.targets`` and the keys of
    ``search.constraints.latency_ms`` registered latency targets (built-in or registered by a plugin)."""
    problems: list[Problem] = []
    search = data.get("search")
    if not isinstance(search, dict):
        return problems
    sampler = search.get("sampler")
    if isinstance(sampler, str) and (problem := SAMPLERS.problem(sampler)) is not None:
        problems.append(Problem("search.sampler", problem))
    targets = search.get("targets")
    for index, name in enumerate(targets if isinstance(targets, list) else []):
        problem = TARGETS.problem(name) if isinstance(name, str) else None
        if problem is not None:
            problems.append(Problem(f"search.targets[{index}]", problem))
    constraints = search.get("constraints")
    limits = constraints.get("latency_ms") if isinstance(constraints, dict) else None
    for name in limits if isinstance(limits, dict) else {}:
        problem = TARGETS.problem(name) if isinstance(name, str) else None
        if problem is not None:
            problems.append(Problem(f"search.constraints.latency_ms.{name}", problem))
    return problems


def _check_training(data: dict[str, Any]) -> list[Problem]:
    """``training.strategy`` and ``training.optimizer`` name known ones; every key of ``training:`` beyond the
    common ones is an option of that strategy, validated by its options model and its ``check_options``."""
    problems: list[Problem] = []
    training = _section(data, "training")
    for key, allowed in (("strategy", STRATEGIES.names()), ("optimizer", OPTIMIZERS)):
        value = _field(TrainingModel, training, key)
        if value is not _INVALID and value not in allowed:
            problems.append(Problem(f"training.{key}", f"must be one of {list(allowed)}, got {value!r}{did_you_mean(value, allowed)}"))
    strategy = _field(TrainingModel, training, "strategy")
    if not isinstance(training, dict) or strategy is _INVALID or strategy not in STRATEGIES:
        return problems
    entry = STRATEGIES.get(strategy)
    common = set(TrainingModel.model_fields)
    own = entry.options_type.model_fields
    clash = sorted(common & set(own))
    if clash:
        message = f"strategy {strategy!r} ({entry.__module__}) declares options {clash} that are common training keys; its options need names of their own"
        return [*problems, Problem("training.strategy", message)]
    options = {}
    for key, value in training.items():
        if key in own:
            options[key] = value
        elif key not in common and isinstance(key, str):
            owners = [name for name, other in STRATEGIES.items() if key in other.options_type.model_fields]
            note = f" (it is an option of {owners})" if owners else ""
            listing = f"options of {strategy!r}: {sorted(own)}, common keys: {sorted(common)}"
            problems.append(Problem(f"training.{key}", f"unknown key for strategy {strategy!r}{note}; {listing}{did_you_mean(key, [*own, *common])}"))
    try:
        validated = entry.options_type.model_validate(options)
    except ValidationError as error:
        located = [{**item, "loc": ("training", *item["loc"])} for item in error.errors()]
        return problems + _pydantic_problems(data, located, root=entry.options_type, skip=1)
    epochs = _field(TrainingModel, training, "epochs")
    if epochs is not _INVALID:
        problems += [Problem(f"training.{key}", message) for key, message in entry.check_options(validated, epochs=epochs)]
    return problems


def _check_semantics(data: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    task = data.get("task")
    dataset = _field(TaskModel, task, "dataset")
    dataset_problem = DATASETS.problem(dataset) if dataset is not _INVALID else None
    if dataset_problem is not None:
        problems.append(Problem("task.dataset", dataset_problem))
    for section, model_class in (("stem", StemModel), ("head", HeadModel)):
        name = _field(model_class, _section(data, section), "activation")
        if name is not _INVALID and name not in ACTIVATIONS:
            problems.append(Problem(f"{section}.activation", f"must be one of {sorted(ACTIVATIONS)}, got {name!r}{did_you_mean(name, ACTIVATIONS)}"))
    problems += _check_training(data)
    modality = _modality(data)
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    for index, stage in enumerate(stages):
        for key in ("depth", "width"):
            values = _field(StageModel, stage, key)
            if values is not _INVALID and len(set(_as_list(values))) != len(_as_list(values)):
                problems.append(Problem(f"stages[{index}].{key}", f"choices must be distinct, got {values}"))
        stride = _field(StageModel, stage, "stride")
        if modality == "sequence" and stride is not _INVALID and stride != 1:
            problems.append(Problem(f"stages[{index}].stride", f"must be 1 for a sequence task, got {stride}"))
    for key in ("resolution", "sequence_length"):
        values = _field(SpaceModel, data, key)
        if isinstance(values, list) and len(set(values)) != len(values):
            problems.append(Problem(key, f"choices must be distinct, got {values}"))
    if modality == "sequence":
        problems += _check_sequence_task(data)
    elif modality == "image":
        problems += _check_image_task(data)
    return problems


def _check_sequence_task(data: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    task = data.get("task")
    input_shape = _field(TaskModel, task, "input_shape")
    if data.get("resolution") is not None:
        problems.append(Problem("resolution", "applies to image tasks; a sequence task uses sequence_length"))
    if input_shape is not _INVALID and len(input_shape) != 1:
        problems.append(Problem("task.input_shape", f"must be [max_sequence_length] for a sequence task, got {list(input_shape)}"))
        input_shape = _INVALID
    lengths = _field(SpaceModel, data, "sequence_length")
    if data.get("sequence_length") is None:
        problems.append(Problem("sequence_length", "is required for a sequence task (one length or a list of choices)"))
    elif lengths is not _INVALID and input_shape is not _INVALID:
        for index, length in enumerate(_as_list(lengths)):
            if length > input_shape[0]:
                where = f"sequence_length[{index}]" if isinstance(lengths, list) else "sequence_length"
                problems.append(Problem(where, f"must be at most task.input_shape[0] = {input_shape[0]}, got {length}"))
    dataset = _field(TaskModel, task, "dataset")
    entry = DATASETS.get(dataset) if dataset is not _INVALID and dataset in DATASETS else None
    owner = f"the {dataset} dataset" if entry is not None else "a sequence task"
    for key in dict.fromkeys(("vocab_size", *(entry.requires if entry is not None else ()))):
        if isinstance(task, dict) and task.get(key) is None:
            problems.append(Problem(f"task.{key}", f"is required for {owner}"))
    vocab_size = _field(TaskModel, task, "vocab_size")
    num_classes = _field(TaskModel, task, "num_classes")
    if vocab_size not in (None, _INVALID) and num_classes is not _INVALID and num_classes != vocab_size:
        problems.append(Problem("task.num_classes", f"must equal task.vocab_size ({vocab_size}) for {owner}, got {num_classes}"))
    return problems


def _check_image_task(data: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    task = data.get("task")
    if data.get("sequence_length") is not None:
        problems.append(Problem("sequence_length", "applies to sequence tasks; an image task uses resolution"))
    dataset = _field(TaskModel, task, "dataset")
    input_shape = _field(TaskModel, task, "input_shape")
    if input_shape is not _INVALID and len(input_shape) != 3:
        problems.append(Problem("task.input_shape", f"must be [channels, height, width] for an image task, got {list(input_shape)}"))
        input_shape = _INVALID
    entry = DATASETS.get(dataset) if dataset is not _INVALID and dataset in DATASETS else None
    for key in entry.requires if entry is not None and isinstance(task, dict) else ():
        if not _field(TaskModel, task, key):
            problems.append(Problem(f"task.{key}", f"is required for the {dataset} dataset"))
    num_classes = _field(TaskModel, task, "num_classes")
    if entry is not None and entry.channels is not None and input_shape is not _INVALID and input_shape[0] != entry.channels:
        problems.append(Problem("task.input_shape[0]", f"{dataset} has {entry.channels} channel(s), got {input_shape[0]}"))
    if entry is not None and entry.num_classes is not None and num_classes is not _INVALID and num_classes != entry.num_classes:
        problems.append(Problem("task.num_classes", f"{dataset} has {entry.num_classes} classes, got {num_classes}"))
    if data.get("resolution") is None:
        problems.append(Problem("resolution", "is required for an image task (one resolution or a list of choices)"))
        return problems
    resolutions = _field(SpaceModel, data, "resolution")
    if resolutions is _INVALID:
        return problems
    stem_stride = _field(StemModel, data.get("stem"), "stride")
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    strides = [_field(StageModel, stage, "stride") for stage in stages]
    stride = None if stem_stride is _INVALID or _INVALID in strides or not strides else stem_stride * math.prod(strides)
    for index, resolution in enumerate(_as_list(resolutions)):
        where = f"resolution[{index}]" if isinstance(resolutions, list) else "resolution"
        if input_shape is not _INVALID and resolution > min(input_shape[1:]):
            problems.append(Problem(where, f"must be at most the input size {min(input_shape[1:])} (task.input_shape = {list(input_shape)}), got {resolution}"))
        if stride is not None and resolution < stride:
            problems.append(Problem(where, f"must be at least the total stride {stride} (stem and stage strides), got {resolution}"))
    return problems


def _build(model: SpaceModel, source: str, text: str) -> RunConfig:
    task = model.task
    sequence = DATASETS.get(task.dataset).modality == "sequence"
    stages = []
    for stage in model.stages:
        blocks = []
        for block in stage.blocks:
            fields = {key: tuple(_as_list(value)) for key, value in block.items() if key != "type"}
            blocks.append(BlockChoices.build(block["type"], fields))
        stages.append(StageSpace(tuple(_as_list(stage.depth)), tuple(_as_list(stage.width)), stage.stride, tuple(blocks)))
    space = SearchSpace(
        name=model.name,
        modality="sequence" if sequence else "image",
        in_channels=task.vocab_size if sequence else task.input_shape[0],
        num_classes=task.num_classes,
        stem=StemSpec(model.stem.channels, model.stem.kernel_size, model.stem.stride, model.stem.activation),
        stages=tuple(stages),
        head=HeadSpec(tuple(model.head.channels), model.head.features, float(model.head.dropout), model.head.activation, model.head.features_bias),
        resolutions=tuple(_as_list(model.resolution)) if not sequence else (),
        sequence_lengths=tuple(_as_list(model.sequence_length)) if sequence else (),
        causal=sequence,
    )
    return RunConfig(space, task, model.training, model.search, source, text)


__all__ = ["ConfigError", "Problem", "RunConfig", "SearchModel", "TaskModel", "TrainingModel", "builtin_spaces", "load_config", "parse_config", "resolve_space"]
