"""Search spaces and architectures as frozen values.

``SearchSpace`` is the validated space (built from YAML by ``nas.space.schema``); ``Arch`` is one point in it: the block
configs of every stage plus the resolution (images) or sequence length (sequences). Everything downstream
(supernet activation, extraction, ONNX metadata, latency tables, predictors, Optuna) consumes ``Arch``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .blocks import BlockChoices, type_of, without_defaults

if TYPE_CHECKING:
    from .walk import SpaceWalk


DIGEST_LENGTH = 6
"""Hex digits of the arch digest in ``Arch.short_name`` (16.7 million values)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule: where (``stages[0].blocks[1].kernel_size``; empty for the whole input) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


MAX_LISTED_PROBLEMS = 200


def format_problems(source: str, problems: Sequence[Problem]) -> str:
    """``source: N problem(s)`` then one ``  - path: message`` line per problem (at most ``MAX_LISTED_PROBLEMS``)."""
    lines = "\n".join(f"  - {problem}" for problem in problems[:MAX_LISTED_PROBLEMS])
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines += f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more"
    return f"{source}: {len(problems)} problem(s)\n{lines}"


class ArchError(ValueError):
    """An architecture that is malformed or not in its search space; ``problems`` lists every broken rule, each with
    its path (``stages[0].blocks[1].kernel_size``), the rule and the value. ``source`` names where the arch came from
    (a file, ``--arch``, ONNX metadata), when known."""

    def __init__(self, problems: str | Problem | Iterable[Problem], source: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}" if source else str(self.problems[0])
        else:
            message = format_problems(source or "arch", self.problems)
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.source))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True, slots=True)
class StemSpec:
    """Image: ``kernel_size`` conv with ``stride`` to ``channels`` + BN + activation. Sequence: token embedding
    of width ``channels`` plus a learned position embedding, then a residual causal depthwise convolution over
    ``kernel_size`` tokens (none when 1); ``stride`` and ``activation`` apply to images only."""

    channels: int
    kernel_size: int = 3
    stride: int = 2
    activation: str = "relu"


@dataclass(frozen=True, slots=True)
class HeadSpec:
    """Image: 1x1 conv + BN + activation for each of ``channels``, global average pool, an optional
    ``features`` linear + activation (MobileNetV3; with a bias unless ``features_bias`` is false: torchvision's has
    one, Once-for-All's has none), dropout, classifier. Sequence: LayerNorm + per-token
    classifier."""

    channels: tuple[int, ...] = ()
    features: int | None = None
    dropout: float = 0.0
    activation: str = "relu"
    features_bias: bool = True

    def __repr__(self) -> str:
        """The dataclass repr, leaving out ``features_bias`` while it has its default: the digest of a space (which
        hardware profiles store) is taken over its repr, and stays what it was before the field existed."""
        text = f"HeadSpec(channels={self.channels!r}, features={self.features!r}, dropout={self.dropout!r}, activation={self.activation!r}"
        return text + ("" if self.features_bias else ", features_bias=False") + ")"


@dataclass(frozen=True, slots=True)
class StageSpace:
    """Choices of one stage: depth, width (output channels of every block), fixed stride, block types."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stride: int
    blocks: tuple[BlockChoices, ...]

    @property
    def entry_projection(self) -> bool:
        """Whether the stage starts with a projection (some allowed block cannot change width or stride)."""
        return not all(choices.entry.reshapes for choices in self.blocks)

    def choices_for(self, type_name: str) -> BlockChoices:
        for choices in self.blocks:
            if choices.type == type_name:
                return choices
        raise KeyError(type_name)


@dataclass(frozen=True, slots=True)
class StageArch:
    width: int
    blocks: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Arch:
    """One subnet: per stage its width and block configs (depth = number of configs), plus input size."""

    stages: tuple[StageArch, ...]
    resolution: int | None = None
    sequence_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "sequence_length": self.sequence_length,
            "stages": [
                {
                    "width": stage.width,
                    "blocks": [{"type": type_of(config).name, **without_defaults(config)} for config in stage.blocks],
                }
                for stage in self.stages
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any, space: SearchSpace | None = None, *, source: str = "") -> Arch:
        """The arch that ``data`` (``to_dict`` output, as JSON or YAML gives it) describes, checked as strictly as a
        space file: unknown keys refused at every level (with a "did you mean"), types exact (an integer field
        refuses ``12.0``, a boolean field ``1``), and, given ``space``, every value one of the space's choices (a
        number field's value is replaced by the space's own choice, so ``4.0`` reads back as ``4``). Raises
        ``ArchError`` listing every problem with its path; ``source`` (a file name, ``--arch``) prefixes its
        message."""
        from .arch_input import parse_arch_data

        return parse_arch_data(data, space, source=source)

    @classmethod
    def from_json(cls, text: str | bytes, space: SearchSpace | None = None, *, source: str = "") -> Arch:
        """``from_dict`` of the JSON ``text`` (``NaN`` and ``Infinity`` are refused)."""
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as error:
            raise ArchError(f"not valid JSON: {error}", source) from None
        return cls.from_dict(data, space, source=source)

    def digest(self) -> str:
        """A short stable digest of the arch JSON (the same in every process and on every machine)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:DIGEST_LENGTH]

    def short_name(self) -> str:
        """A compact label for logs and file names (never parsed back): input size, per stage width and depth,
        then ``digest()``, so that archs differing only in block fields get different names."""
        parts = [f"w{stage.width}d{len(stage.blocks)}" for stage in self.stages]
        size = f"r{self.resolution}" if self.resolution else f"l{self.sequence_length}"
        return "_".join([size, *parts, self.digest()])


@dataclass(frozen=True, slots=True)
class SearchSpace:
    """A validated search space. ``in_channels`` is the image channel count, or the vocabulary size for sequences."""

    name: str
    modality: str
    in_channels: int
    num_classes: int
    stem: StemSpec
    stages: tuple[StageSpace, ...]
    head: HeadSpec
    resolutions: tuple[int, ...] = ()
    sequence_lengths: tuple[int, ...] = ()
    causal: bool = False

    @property
    def input_sizes(self) -> tuple[int, ...]:
        return self.resolutions if self.modality == "image" else self.sequence_lengths

    def walk(self) -> SpaceWalk:
        """The space's one walk over its decision variables (cached); everything below derives from it."""
        from .walk import space_walk

        return space_walk(self)

    def largest(self, block_type: str | None = None) -> Arch:
        """Max depth, max width, every block at its largest choice, largest input. Blocks are of ``block_type``
        where a stage allows it, else of the stage's first-listed type."""
        return self.walk().extreme(True, block_type)

    def smallest(self, block_type: str | None = None) -> Arch:
        """Like ``largest`` with every choice at its smallest."""
        return self.walk().extreme(False, block_type)

    def sample(self, rng: np.random.Generator) -> Arch:
        """A uniformly random arch of this space, per choice (per stage depth, width, then per position the block
        type and its fields; then the input size)."""
        return self.walk().sample(rng)

    def count(self) -> int:
        """Exact number of distinct subnets (a Python int, however large)."""
        return self.walk().count()

    def check(self, arch: Arch) -> None:
        """Raise ``ArchError`` listing every place where ``arch`` leaves this space (the rules of ``Arch.from_dict``)."""
        self.walk().check(arch)

    def canonical(self, arch: Arch) -> Arch:
        """``arch`` checked, with every value replaced by the space's own choice (a number field's ``4.0`` by the
        choice ``4``), so that its JSON, digest and short name are those of the same arch sampled from the space."""
        return self.walk().canonical(arch)
