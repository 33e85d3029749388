"""Search spaces and architectures as frozen values.

``SearchSpace`` is the validated space (built from YAML by ``nas.space.schema``); ``Arch`` is one point in it: the block
configs of every stage plus the resolution (images) or sequence length (sequences). Everything downstream
(supernet activation, extraction, ONNX metadata, latency tables, predictors, Optuna) consumes ``Arch``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .blocks import BlockChoices, block_type, type_of


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

    def block_count(self) -> int:
        """Number of distinct block configs at one position."""
        return sum(choices.count() for choices in self.blocks)


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

    def short_name(self) -> str:
        """A compact label for logs and file names (never parsed back)."""
        parts = []
        for stage in self.stages:
            depth = len(stage.blocks)
            parts.append(f"w{stage.width}d{depth}")
        size = f"r{self.resolution}" if self.resolution else f"l{self.sequence_length}"
        return "_".join([size, *parts])


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

    def _arch(self, stages: list[StageArch], size: int) -> Arch:
        if self.modality == "image":
            return Arch(tuple(stages), resolution=size)
        return Arch(tuple(stages), sequence_length=size)

    def _extreme(self, largest: bool, block_type: str | None) -> Arch:
        pick = max if largest else min
        stages = []
        for stage in self.stages:
            choices = stage.choices_for(block_type) if block_type in {c.type for c in stage.blocks} else stage.blocks[0]
            config = choices.largest() if largest else choices.smallest()
            stages.append(StageArch(pick(stage.widths), (config,) * pick(stage.depths)))
        return self._arch(stages, pick(self.input_sizes))

    def largest(self, block_type: str | None = None) -> Arch:
        """Max depth, max width, every block at its largest choice, largest input. Blocks are of ``block_type``
        where a stage allows it, else of the stage's first-listed type."""
        return self._extreme(True, block_type)

    def smallest(self, block_type: str | None = None) -> Arch:
        """Like ``largest`` with every choice at its smallest."""
        return self._extreme(False, block_type)

    def sample(self, rng: np.random.Generator) -> Arch:
        """A uniformly random arch of this space, per choice (depth, width, block type, each field, input size)."""
        stages = []
        for stage in self.stages:
            depth = stage.depths[rng.integers(len(stage.depths))]
            width = stage.widths[rng.integers(len(stage.widths))]
            blocks = tuple(stage.blocks[rng.integers(len(stage.blocks))].sample(rng) for _ in range(depth))
            stages.append(StageArch(width, blocks))
        sizes = self.input_sizes
        return self._arch(stages, sizes[rng.integers(len(sizes))])

    def count(self) -> int:
        """Exact number of distinct subnets (a Python int, however large)."""
        total = len(self.input_sizes)
        for stage in self.stages:
            per_block = stage.block_count()
            total *= len(stage.widths) * sum(per_block**depth for depth in stage.depths)
        return total

    def check(self, arch: Arch) -> None:
        """Raise ``ArchError`` naming the first place where ``arch`` leaves this space."""
        if len(arch.stages) != len(self.stages):
            raise ArchError(f"arch has {len(arch.stages)} stages, the space {self.name!r} has {len(self.stages)}")
        size_name, size = ("resolution", arch.resolution) if self.modality == "image" else ("sequence_length", arch.sequence_length)
        if size not in self.input_sizes:
            raise ArchError(f"{size_name} must be one of {list(self.input_sizes)}, got {size}")
        for index, (stage, stage_arch) in enumerate(zip(self.stages, arch.stages)):
            where = f"stages[{index}]"
            if stage_arch.width not in stage.widths:
                raise ArchError(f"{where}.width must be one of {list(stage.widths)}, got {stage_arch.width}")
            if len(stage_arch.blocks) not in stage.depths:
                raise ArchError(f"{where}.depth must be one of {list(stage.depths)}, got {len(stage_arch.blocks)}")
            for position, config in enumerate(stage_arch.blocks):
                try:
                    name = type_of(config).name
                    stage.choices_for(name).check(config)
                except KeyError:
                    allowed = [choices.type for choices in stage.blocks]
                    raise ArchError(f"{where}.blocks[{position}].type must be one of {allowed}") from None
                except (TypeError, ValueError) as error:
                    raise ArchError(f"{where}.blocks[{position}]: {error}") from None
