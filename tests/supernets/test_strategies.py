"""The training-strategy interface: tasks, phases, space restriction, the schedule, and a contract every registered
strategy meets (deterministic for a seed, archs inside the space, state that survives JSON)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from nas.space.schema import parse_config
from nas.supernets.space import SearchSpace
from nas.supernets.strategies import (
    INPLACE,
    STRATEGIES,
    FrozenTeacher,
    Phase,
    Schedule,
    StrategyError,
    SubnetTask,
    TrainingStrategy,
    keep_first,
    keep_largest,
    keep_largest_fields,
    keep_smallest,
    largest_only,
    restrict_space,
)
from nas.supernets.strategies.sandwich import SandwichOptions, SandwichRule
from tests.helpers import TINY_DIGITS_SPACE

MIXED_SPACE = """\
name: mixed
task: {dataset: mqar, input_shape: [32], num_classes: 32, vocab_size: 32, num_kv_pairs: 4, num_train: 64, num_val: 16, num_test: 16}
stem: {channels: 16, kernel_size: 4}
stages:
  - depth: [1, 2, 3]
    width: [16, 24]
    blocks:
      - {type: gated_attention, num_heads: [1, 2], head_dim: [8, 16], ffn: [glu, mlp], mlp_ratio: [1, 2], activation: gelu}
      - {type: gla, num_heads: [1, 2], key_dim: [8, 16], value_dim: 16, ffn: glu, mlp_ratio: [1, 2], activation: gelu}
sequence_length: [16, 24, 32]
"""


def digits_space() -> SearchSpace:
    return parse_config(TINY_DIGITS_SPACE).space


def mixed_space() -> SearchSpace:
    return parse_config(MIXED_SPACE).space


def schedule(epochs: int = 4, steps_per_epoch: int = 5) -> Schedule:
    return Schedule(lr=0.01, epochs=epochs, warmup_epochs=1, steps_per_epoch=steps_per_epoch)


def test_restriction_keeps_the_chosen_subset_of_every_decision_variable() -> None:
    space = digits_space()
    narrow = restrict_space(space, input_sizes=keep_largest(), depths=keep_smallest(), widths=keep_smallest(), fields=keep_largest_fields())
    assert narrow.resolutions == (8,)
    assert narrow.stages[0].depths == (1,) and narrow.stages[0].widths == (8,)
    assert dict(narrow.stages[0].blocks[0].fields) == {"kernel_size": (5,), "expand_ratio": (3,), "activation": ("relu",), "squeeze_excite": (True,)}
    assert narrow.count() == 1
    assert narrow.largest() == narrow.smallest()
    assert restrict_space(space, depths=keep_largest(2)).count() == space.count()
    rng = np.random.default_rng(0)
    kernels_only = restrict_space(space, fields=lambda type_name, name, values: values if name == "kernel_size" else values[:1])
    assert kernels_only.count() == 2 * 2 * (2 + 2**2)
    for _ in range(20):
        arch = kernels_only.sample(rng)
        space.check(arch)
        assert all(config.expand_ratio == 2 and config.squeeze_excite is False for config in arch.stages[0].blocks)


def test_restriction_of_block_types_and_sequence_lengths() -> None:
    space = mixed_space()
    attention = restrict_space(space, block_types=keep_first(), input_sizes=keep_smallest(2))
    assert [choices.type for choices in attention.stages[0].blocks] == ["gated_attention"]
    assert attention.sequence_lengths == (16, 24)
    assert largest_only(space).count() == 1
    assert largest_only(space).largest() == space.largest()
    assert largest_only(digits_space()).largest() == digits_space().largest()


@pytest.mark.parametrize(
    ("arguments", "where"),
    [
        ({"widths": lambda values: []}, "stages[0].width"),
        ({"depths": lambda values: [7]}, "stages[0].depth"),
        ({"input_sizes": lambda values: [5]}, "resolution"),
        ({"fields": lambda type_name, name, values: () if name == "kernel_size" else values}, "stages[0].mbconv.kernel_size"),
    ],
)
def test_a_restriction_to_nothing_or_to_foreign_values_names_the_variable(arguments: dict, where: str) -> None:
    with pytest.raises(StrategyError, match=re.escape(f"{where} must keep a non-empty subset")):
        restrict_space(digits_space(), **arguments)


def test_subnet_task_states_its_rules() -> None:
    arch = digits_space().largest()
    assert SubnetTask(arch).label_weight == 1.0
    SubnetTask(arch, label_weight=0.5, teacher=FrozenTeacher("start", arch), teacher_weight=2.0, lr_scale=0.1)
    with pytest.raises(StrategyError, match="teacher_weight must be > 0 exactly when a teacher is given"):
        SubnetTask(arch, teacher=INPLACE)
    with pytest.raises(StrategyError, match="teacher_weight must be > 0 exactly when a teacher is given"):
        SubnetTask(arch, teacher_weight=1.0)
    with pytest.raises(StrategyError, match="label_weight > 0 or teacher_weight > 0"):
        SubnetTask(arch, label_weight=0.0)
    for bad in (-1.0, math.nan, math.inf, True):
        with pytest.raises(StrategyError, match="lr_scale must be a finite number >= 0"):
            SubnetTask(arch, lr_scale=bad)
    with pytest.raises(StrategyError, match="lower_snake_case"):
        Phase("Warm Up", digits_space())
    with pytest.raises(StrategyError, match="lower_snake_case"):
        Phase("warm_up", digits_space(), freeze=("phase.one",))


def test_schedule_is_linear_warmup_then_cosine_to_zero() -> None:
    run = schedule(epochs=4, steps_per_epoch=5)
    assert run.at(0) == pytest.approx(0.01 / 5)
    assert run.at(4) == pytest.approx(0.01)
    assert run.at(5) == pytest.approx(0.01)
    assert run.at(20) == pytest.approx(0.0, abs=1e-12)
    assert all(run.at(step) >= run.at(step + 1) for step in range(5, 20))
    single = Schedule(lr=0.1, epochs=1, warmup_epochs=3, steps_per_epoch=1)
    assert single.at(0) == pytest.approx(0.1)


def test_sandwich_tasks_largest_teaches_smallest_and_random_ones() -> None:
    space = digits_space()
    rule = SandwichRule(space, SandwichOptions(random_subnets=2, largest_only_epochs=1), schedule())
    assert rule.phase(0).name == "largest_only" and rule.phase(0).space.count() == 1
    assert rule.phase(1).name == "sandwich" and rule.phase(1).space == space
    warm = rule.tasks(rule.phase(0), np.random.default_rng(0), 0, 0)
    assert warm == [SubnetTask(space.largest(), provides_teacher=True)]
    tasks = rule.tasks(rule.phase(1), np.random.default_rng(0), 1, 0)
    assert len(tasks) == 4 and tasks[0] == warm[0] and tasks[1].arch == space.smallest()
    assert all(task.teacher is INPLACE and task.label_weight == 0 and task.teacher_weight == 1 for task in tasks[1:])
    labels = SandwichRule(space, SandwichOptions(distill=False), schedule()).tasks(Phase("sandwich", space), np.random.default_rng(0), 0, 0)
    assert all(task.teacher is None and task.label_weight == 1 for task in labels)


def test_sandwich_trains_the_smallest_of_every_block_family_in_turn() -> None:
    space = mixed_space()
    families = list(dict.fromkeys(choices.type for stage in space.stages for choices in stage.blocks))
    assert len(families) >= 2
    rule = SandwichRule(space, SandwichOptions(random_subnets=0), schedule())
    steps = [rule.tasks(rule.phase(0), np.random.default_rng(0), 0, step) for step in range(2 * len(families))]
    assert all(tasks[0].arch == space.largest() for tasks in steps)
    assert [tasks[1].arch for tasks in steps] == [space.smallest(family) for family in families] * 2
    labels = SandwichRule(space, SandwichOptions(distill=False), schedule()).tasks(Phase("sandwich", space), np.random.default_rng(0), 0, 0)
    assert all(task.teacher is None and task.label_weight == 1 for task in labels)
    with pytest.raises(StrategyError, match="takes SandwichOptions options"):
        SandwichRule(space, {"random_subnets": 1}, schedule())  # type: ignore[arg-type]


def default_strategy(name: str, space: SearchSpace, run: Schedule) -> TrainingStrategy:
    strategy_class = STRATEGIES.get(name)
    try:
        options = strategy_class.options_type()
    except Exception as error:
        pytest.skip(f"strategy {name!r} has required options: {error}")
    return strategy_class(space, options, run)


@pytest.mark.parametrize("name", STRATEGIES.names())
@pytest.mark.parametrize("space_factory", [digits_space, mixed_space], ids=["digits", "mixed"])
def test_every_strategy_is_deterministic_stays_in_its_space_and_keeps_json_state(name: str, space_factory) -> None:
    space = space_factory()
    run = schedule(epochs=6, steps_per_epoch=3)  # one epoch per phase of progressive shrinking on these spaces
    first, second = default_strategy(name, space, run), default_strategy(name, space, run)
    for epoch in range(run.epochs):
        phase = first.phase(epoch)
        assert phase == second.phase(epoch)
        assert 1 <= phase.space.count() <= space.count()
        for step in range(run.steps_per_epoch):
            seed = epoch * 100 + step
            tasks = first.tasks(phase, np.random.default_rng(seed), epoch, step)
            assert tasks == second.tasks(phase, np.random.default_rng(seed), epoch, step)
            assert tasks, "a step trains at least one subnet"
            for task in tasks:
                space.check(task.arch)
                phase.space.check(task.arch)
            assert first.learning_rate(epoch, step) == second.learning_rate(epoch, step) >= 0
        state = first.state_dict()
        assert json.loads(json.dumps(state, allow_nan=False)) == state
        second.load_state_dict(json.loads(json.dumps(state)))
