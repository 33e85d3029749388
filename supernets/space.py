"""Search spaces and architectures as frozen values.

``SearchSpace`` is the validated space (built from YAML by ``nas.space.schema``); ``Arch`` is one point in it: the block
configs of every stage plus the resolution (images) or sequence length (sequences). Everything downstream
(supernet activation, extraction, ONNX metadata, latency tables, predictors, Optuna) consumes ``Arch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .blocks import BlockChoices, block_type, type_of

if TYPE_CHECKING:
    from .walk import SpaceWalk


DIGEST_LENGTH = 6
"""Hex digits of the arch digest in ``Arch.short_name`` (16.7 million values)."""


class ArchError(ValueError):
    """An architecture that is not in its search space (the message names the place and the allowed values)."""


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
    ``features`` linear + activation (MobileNetV3), dropout, classifier. Sequence: LayerNorm + per-token
    classifier."""

    channels: tuple[int, ...] = ()
    features: int | None = None
    dropout: float = 0.0
    activation: str = "relu"


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
                    "blocks": [{"type": type_of(config).name, **dataclasses.asdict(config)} for config in stage.blocks],
                }
                for stage in self.stages
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Arch:
        """Parse ``to_dict`` output; raises ``ArchError`` naming the broken place."""
        if not isinstance(data, dict):
            raise ArchError(f"an arch must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"resolution", "sequence_length", "stages"}
        if unknown:
            raise ArchError(f"arch has unknown keys {sorted(unknown)}")
        stages = data.get("stages")
        if not isinstance(stages, list):
            raise ArchError("arch.stages must be a list")
        parsed = []
        for index, stage in enumerate(stages):
            where = f"stages[{index}]"
            if not isinstance(stage, dict) or not isinstance(stage.get("blocks"), list) or "width" not in stage:
                raise ArchError(f"{where} must be a mapping with 'width' and a list 'blocks'")
            configs = []
            for position, block in enumerate(stage["blocks"]):
                block_where = f"{where}.blocks[{position}]"
                if not isinstance(block, dict) or "type" not in block:
                    raise ArchError(f"{block_where} must be a mapping with a 'type'")
                fields = dict(block)
                try:
                    entry = block_type(fields.pop("type"))
                    configs.append(entry.config_class(**fields))
                except (KeyError, TypeError) as error:
                    raise ArchError(f"{block_where}: {error}") from None
            parsed.append(StageArch(width=stage["width"], blocks=tuple(configs)))
        return cls(tuple(parsed), data.get("resolution"), data.get("sequence_length"))

    @classmethod
    def from_json(cls, text: str) -> Arch:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as error:
            raise ArchError(f"arch is not valid JSON: {error}") from None

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
        """Raise ``ArchError`` naming the first place where ``arch`` leaves this space."""
        self.walk().check(arch)
