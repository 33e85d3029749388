"""The one walk over a space's decision variables: sampling as before, exact counts, extremes, checks, params <-> arch,
mutation, feature vectors, and the arch digest in short names."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from nas.space.schema import builtin_spaces, load_config, parse_config
from nas.supernets.blocks import type_of
from nas.supernets.space import Arch, ArchError, SearchSpace, StageArch
from nas.supernets.walk import SpaceWalk, space_walk
from tests.helpers import TINY_DIGITS_SPACE

MIXED_SPACE = """
name: mixed
task: {dataset: mqar, input_shape: [32], num_classes: 16, vocab_size: 16, num_kv_pairs: 2, num_train: 64, num_val: 16, num_test: 16}
stem: {channels: 16, kernel_size: 1}
stages:
  - depth: [2, 3]
    width: [16, 24]
    blocks:
      - {type: gated_attention, num_heads: [1, 2], head_dim: [8, 16], ffn: glu, mlp_ratio: [1, 2], activation: gelu}
      - {type: gla, num_heads: [1, 2], key_dim: [8, 16], value_dim: 16, ffn: glu, mlp_ratio: 1, activation: gelu}
sequence_length: [16, 32]
"""
"""Two block types at every position, an optional third position, single-choice fields: every kind of condition."""


def spaces() -> dict[str, SearchSpace]:
    found = {name: load_config(name).space for name in sorted(builtin_spaces())}
    found["tiny_digits"] = parse_config(TINY_DIGITS_SPACE).space
    found["mixed"] = parse_config(MIXED_SPACE).space
    return found


SPACES = spaces()
PINNED_NAMES = ["r8_w12d2_7ff1df", "r6_w8d1_c83cc3"]
"""``short_name()`` of the largest and smallest arch of ``TINY_DIGITS_SPACE``."""


def hand_written_sample(space: SearchSpace, rng: np.random.Generator) -> Arch:
    """The sampler the walk replaced, kept as the reference for its draw order."""
    stages = []
    for stage in space.stages:
        depth = stage.depths[rng.integers(len(stage.depths))]
        width = stage.widths[rng.integers(len(stage.widths))]
        blocks = tuple(stage.blocks[rng.integers(len(stage.blocks))].sample(rng) for _ in range(depth))
        stages.append(StageArch(width, blocks))
    sizes = space.input_sizes
    size = sizes[rng.integers(len(sizes))]
    return Arch(tuple(stages), resolution=size) if space.modality == "image" else Arch(tuple(stages), sequence_length=size)


def hand_written_extreme(space: SearchSpace, largest: bool, block_type: str | None) -> Arch:
    pick = max if largest else min
    stages = []
    for stage in space.stages:
        types = [choices.type for choices in stage.blocks]
        choices = stage.choices_for(block_type) if block_type in types else stage.blocks[0]
        config = choices.largest() if largest else choices.smallest()
        stages.append(StageArch(pick(stage.widths), (config,) * pick(stage.depths)))
    size = pick(space.input_sizes)
    return Arch(tuple(stages), resolution=size) if space.modality == "image" else Arch(tuple(stages), sequence_length=size)


def every_arch(space: SearchSpace) -> set[Arch]:
    """Every arch of a small space, enumerated without the walk."""
    archs = set()
    for size in space.input_sizes:
        per_stage = []
        for stage in space.stages:
            configs = [config for choices in stage.blocks for config in choices.configs()]
            per_stage.append(
                [StageArch(width, blocks) for width in stage.widths for depth in stage.depths for blocks in itertools.product(configs, repeat=depth)]
            )
        for stages in itertools.product(*per_stage):
            archs.add(Arch(stages, resolution=size) if space.modality == "image" else Arch(stages, sequence_length=size))
    return archs


@pytest.mark.parametrize("name", sorted(SPACES))
def test_sample_draws_exactly_like_the_hand_written_sampler(name: str) -> None:
    space = SPACES[name]
    walked, reference = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(40):
        assert space.sample(walked) == hand_written_sample(space, reference)
    assert walked.random() == reference.random(), "the walk must leave the generator where the old sampler did"


@pytest.mark.parametrize("name", sorted(SPACES))
def test_extremes_match_the_hand_written_ones(name: str) -> None:
    space = SPACES[name]
    types = sorted({choices.type for stage in space.stages for choices in stage.blocks})
    for block_type in [None, *types]:
        assert space.largest(block_type) == hand_written_extreme(space, True, block_type)
        assert space.smallest(block_type) == hand_written_extreme(space, False, block_type)


@pytest.mark.parametrize("name", ["tiny_digits", "mixed", "mqar_quick", "mobilenet_v2"])
def test_count_is_exact(name: str) -> None:
    space = SPACES[name]
    archs = every_arch(space)
    assert space.count() == len(archs)
    for arch in archs:
        space.check(arch)


def test_count_of_large_spaces_is_a_python_int() -> None:
    assert SPACES["ofa_mbv3"].count() == 25 * 21758655492572485851 == 543966387314312146275


def test_decisions_state_their_conditions() -> None:
    walk = space_walk(SPACES["mixed"])
    by_name = walk.by_name
    assert [decision.name for decision in walk.decisions[:4]] == ["s0.depth", "s0.width", "s0.b0.type", "s0.b0.gated_attention.num_heads"]
    assert walk.decisions[-1].name == "size"
    assert by_name["s0.depth"].condition == "always"
    assert by_name["s0.b0.type"].condition == "always"
    assert by_name["s0.b1.type"].condition == "always", "every depth choice reaches position 1"
    assert by_name["s0.b1.gla.key_dim"].condition == "s0.b1.type == 'gla'"
    assert by_name["s0.b2.type"].condition == "s0.depth > 2"
    assert by_name["s0.b2.gla.key_dim"].condition == "s0.depth > 2 and s0.b2.type == 'gla'"
    assert by_name["s0.b0.gla.key_dim"].condition == "s0.b0.type == 'gla'"
    assert by_name["s0.b1.gla.key_dim"].active({"s0.depth": 2, "s0.b1.type": "gla"})
    assert not by_name["s0.b1.gla.key_dim"].active({"s0.depth": 2, "s0.b1.type": "gated_attention"})
    assert not by_name["s0.b2.type"].active({"s0.depth": 2})
    assert not by_name["s0.b0.gla.value_dim"].free and by_name["s0.b0.gla.key_dim"].free
    digits = space_walk(SPACES["tiny_digits"]).by_name
    assert digits["s0.b1.mbconv.kernel_size"].condition == "s0.depth > 1", "one block type: no type condition"


def test_space_walk_is_cached_per_space() -> None:
    space = SPACES["mixed"]
    assert space.walk() is space_walk(space) is space_walk(parse_config(MIXED_SPACE).space)
    assert isinstance(space.walk(), SpaceWalk)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_params_round_trip_and_hold_only_active_decisions(name: str) -> None:
    space = SPACES[name]
    walk = space.walk()
    rng = np.random.default_rng(0)
    for arch in [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(30))]:
        params = walk.params(arch)
        assert walk.from_params(params) == arch
        values = walk.values(arch)
        assert all(walk.by_name[key].active(values) for key in values)
        assert set(params) == {key for key in values if walk.by_name[key].free}
        for stage_index, stage in enumerate(arch.stages):
            for position, config in enumerate(stage.blocks):
                type_name = type_of(config).name
                assert values[f"s{stage_index}.b{position}.type"] == type_name
                other = [key for key in params if key.startswith(f"s{stage_index}.b{position}.") and key.split(".")[2] not in ("type", type_name)]
                assert not other, f"fields of a type not chosen: {other}"
            assert not [key for key in params if key.startswith(f"s{stage_index}.b{len(stage.blocks)}.")], "a position past the depth"


def test_from_params_refuses_missing_inactive_and_unknown_parameters() -> None:
    space = SPACES["mixed"]
    walk = space.walk()
    arch = walk.extreme(True, "gla")
    params = walk.params(arch)
    missing = {key: value for key, value in params.items() if key != "s0.b1.gla.key_dim"}
    with pytest.raises(ArchError, match=r"parameter 's0.b1.gla.key_dim' \(stages\[0\].blocks\[1\].key_dim\) is missing"):
        walk.from_params(missing)
    with pytest.raises(ArchError, match=r"'s0.b1.gated_attention.head_dim' is inactive .* only when s0.b1.type == 'gated_attention'"):
        walk.from_params({**params, "s0.b1.gated_attention.head_dim": 8})
    with pytest.raises(ArchError, match=r"unknown parameter\(s\) \['s9.depth'\]"):
        walk.from_params({**params, "s9.depth": 1})
    with pytest.raises(ArchError, match=r"stages\[0\].blocks\[0\].key_dim: must be one of \[8, 16\], got 12"):
        walk.from_params({**params, "s0.b0.gla.key_dim": 12})


def test_check_names_the_place_the_rule_and_the_value() -> None:
    space = SPACES["mixed"]
    good = space.largest("gla")
    stage = good.stages[0]
    bad_field = dataclasses.replace(stage.blocks[1], key_dim=12)
    cases = {
        r"sequence_length: must be one of \[16, 32\], got 20": dataclasses.replace(good, sequence_length=20),
        r"stages\[0\].width: must be one of \[16, 24\], got 20": Arch((StageArch(20, stage.blocks),), sequence_length=32),
        r"stages\[0\].depth: must be one of \[2, 3\], got 4 \(the number of blocks listed\)": Arch(
            (StageArch(24, (*stage.blocks, stage.blocks[0])),), sequence_length=32
        ),
        r"stages\[0\].blocks\[1\].key_dim: must be one of \[8, 16\], got 12": Arch(
            (StageArch(24, (stage.blocks[0], bad_field, stage.blocks[2])),), sequence_length=32
        ),
        r"stages: must list 1 stage\(s\), as the space 'mixed' has, got 2": Arch((stage, stage), sequence_length=32),
    }
    for message, arch in cases.items():
        with pytest.raises(ArchError, match=message):
            space.check(arch)
    image = SPACES["tiny_digits"].largest()
    with pytest.raises(ArchError, match=r"stages\[0\].blocks\[0\].type: must be one of \['gated_attention', 'gla'\], got 'mbconv'"):
        space.check(Arch((StageArch(24, image.stages[0].blocks),), sequence_length=32))
    with pytest.raises(ArchError, match=r"stages\[0\].blocks\[0\].type: int is not a registered block config"):
        space.check(Arch((StageArch(24, (3, 3)),), sequence_length=32))


@pytest.mark.parametrize("name", ["tiny_digits", "mixed", "ofa_mbv3"])
def test_mutation_moves_exactly_one_active_decision(name: str) -> None:
    space = SPACES[name]
    walk = space.walk()
    rng = np.random.default_rng(3)
    moved_kinds = set()
    for _ in range(200):
        parent = space.sample(rng)
        child = walk.mutate(parent, rng)
        space.check(child)
        assert child != parent
        before, after = walk.values(parent), walk.values(child)
        changed = [key for key in before if key in after and before[key] != after[key]]
        assert len(changed) == 1, changed
        moved = walk.by_name[changed[0]]
        moved_kinds.add(moved.kind)
        if moved.kind not in ("depth", "type"):
            assert before.keys() == after.keys(), "only a depth or type change makes other decisions (in)active"
    assert moved_kinds == {decision.kind for decision in walk.free_decisions}


def test_mutation_of_a_single_arch_space_is_refused() -> None:
    space = SPACES["mobilenet_v2"]
    with pytest.raises(ArchError, match="has a single arch; there is nothing to mutate"):
        space.walk().mutate(space.largest(), np.random.default_rng(0))


def test_features_are_one_hot_per_active_decision_and_zero_when_inactive() -> None:
    space = SPACES["mixed"]
    walk = space.walk()
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(25)]
    matrix = walk.features(archs)
    assert matrix.shape == (25, len(walk.feature_names)) and matrix.dtype == np.float32
    assert len(set(walk.feature_names)) == len(walk.feature_names)
    assert "s0.b2.gla.key_dim=16" in walk.feature_names and "size=32" in walk.feature_names
    column = {name: index for index, name in enumerate(walk.feature_names)}
    for arch, row in zip(archs, matrix, strict=True):
        params = walk.params(arch)
        assert row.sum() == len(params)
        for key, value in params.items():
            assert row[column[f"{key}={value}"]] == 1.0
        if len(arch.stages[0].blocks) < 3:
            assert not row[[index for name, index in column.items() if name.startswith("s0.b2.")]].any()
    assert walk.features([]).shape == (0, len(walk.feature_names))
    assert space_walk(SPACES["mobilenet_v2"]).features([SPACES["mobilenet_v2"].largest()]).shape == (1, 0)


def test_archs_differing_only_in_a_block_field_get_different_short_names() -> None:
    space = SPACES["tiny_digits"]
    first = space.largest()
    blocks = list(first.stages[0].blocks)
    blocks[1] = dataclasses.replace(blocks[1], kernel_size=3)
    second = Arch((StageArch(first.stages[0].width, tuple(blocks)),), resolution=first.resolution)
    space.check(second)
    assert first.short_name() != second.short_name()
    assert first.short_name().rsplit("_", 1)[0] == second.short_name().rsplit("_", 1)[0] == "r8_w12d2"
    assert first.short_name() == f"r8_w12d2_{first.digest()}" and len(first.digest()) == 6


def test_short_names_are_stable_across_processes() -> None:
    space = SPACES["tiny_digits"]
    archs = [space.largest(), space.smallest()]
    script = "import sys\nfrom nas.supernets.space import Arch\nfor line in sys.stdin.read().splitlines():\n    print(Arch.from_json(line).short_name())\n"
    names = [arch.short_name() for arch in archs]
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", script],
            input="\n".join(arch.to_json() for arch in archs),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert result.stdout.split() == names
    assert names == PINNED_NAMES, "the digest is part of exported folder names: changing it renames every export"
