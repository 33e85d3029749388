"""Progressive shrinking (Once-for-All) and Delayed ε-Shrinking: which dimensions are elastic in which epoch, the
importance reordering that leaves the largest network unchanged, the per-phase learning rates, DεpS's incremental
subnet learning rate, and their options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nas.space.schema import ConfigError, parse_config
from nas.supernets.blocks import BLOCKS, SHRINK_KINDS, choice, field_shrinks
from nas.supernets.blocks.base import IntRule
from nas.supernets.elastic import importance_order
from nas.supernets.space import SearchSpace
from nas.supernets.strategies import STRATEGIES, Schedule
from nas.supernets.strategies.deps import DelayedShrinking, DepsOptions
from nas.supernets.strategies.progressive_shrinking import ProgressiveShrinking, ProgressiveShrinkingOptions, allocate_epochs
from nas.supernets.supernet import Supernet
from tests.helpers import randomise_batch_norm
from tests.supernets.test_strategies import MIXED_SPACE

WIDE_SPACE = """\
name: wide
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, kernel_size: 3, stride: 1, activation: relu}
stages:
  - depth: [1, 2, 3]
    width: [8, 12, 16]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5, 7], expand_ratio: [2, 3, 4], activation: relu, squeeze_excite: [false, true]}
      - {type: gated_attention, num_heads: [1, 2], head_dim: [4, 8], ffn: [glu, mlp], mlp_ratio: [1, 2], activation: gelu}
head: {channels: [32]}
resolution: [6, 8]
"""


def space(text: str = WIDE_SPACE) -> SearchSpace:
    return parse_config(text).space


def strategy(epochs: int = 12, **options: object) -> ProgressiveShrinking:
    schedule = Schedule(lr=0.1, epochs=epochs, warmup_epochs=1, steps_per_epoch=4)
    return ProgressiveShrinking(space(), ProgressiveShrinkingOptions.model_validate(options), schedule)


def choices(phase_space: SearchSpace) -> dict[str, object]:
    stage = phase_space.stages[0]
    return {
        "depths": stage.depths,
        "widths": stage.widths,
        "types": tuple(block.type for block in stage.blocks),
        **{f"mbconv.{name}": values for name, values in stage.blocks[0].fields},
        "resolutions": phase_space.resolutions,
    }


def test_every_block_field_declares_how_it_shrinks() -> None:
    for name, entry in BLOCKS.items():
        kinds = field_shrinks(entry.config_class)
        assert set(kinds) == set(entry.rules), name
        assert set(kinds.values()) <= set(SHRINK_KINDS), name
    assert field_shrinks(BLOCKS.get("mbconv").config_class) == {
        "kernel_size": "kernel",
        "expand_ratio": "width",
        "activation": "switch",
        "squeeze_excite": "switch",
    }
    with pytest.raises(ValueError, match="shrinks=.*must be one of.*'kernal'.*did you mean 'kernel'"):
        choice(IntRule(1, 3), "a size", shrinks="kernal")


def test_progressive_shrinking_unlocks_kernel_then_depth_then_width_per_epoch() -> None:
    shrinking = strategy(epochs=12)
    assert [(p.name, p.start, p.epochs) for p in shrinking.plan] == [
        ("full", 0, 3),
        ("kernel", 3, 2),
        ("depth_1", 5, 2),
        ("depth_2", 7, 2),
        ("width_1", 9, 1),
        ("width_2", 10, 2),
    ]
    expected = {
        "full": dict(depths=(3,), widths=(16,), types=("mbconv",), k=(7,), e=(4,), se=(True,)),
        "kernel": dict(depths=(3,), widths=(16,), types=("mbconv",), k=(3, 5, 7), e=(4,), se=(True,)),
        "depth_1": dict(depths=(2, 3), widths=(16,), types=("mbconv",), k=(3, 5, 7), e=(4,), se=(True,)),
        "depth_2": dict(depths=(1, 2, 3), widths=(16,), types=("mbconv",), k=(3, 5, 7), e=(4,), se=(True,)),
        "width_1": dict(depths=(1, 2, 3), widths=(12, 16), types=("mbconv",), k=(3, 5, 7), e=(3, 4), se=(True,)),
        "width_2": dict(depths=(1, 2, 3), widths=(8, 12, 16), types=("mbconv", "gated_attention"), k=(3, 5, 7), e=(2, 3, 4), se=(False, True)),
    }
    seen = []
    for epoch in range(12):
        phase = shrinking.phase(epoch)
        seen.append(phase.name)
        found = choices(phase.space)
        want = expected[phase.name]
        assert found["depths"] == want["depths"] and found["widths"] == want["widths"] and found["types"] == want["types"], (epoch, phase.name)
        assert (found["mbconv.kernel_size"], found["mbconv.expand_ratio"], found["mbconv.squeeze_excite"]) == (want["k"], want["e"], want["se"])
        assert found["resolutions"] == (6, 8), "the input size is elastic from the start"
        assert phase.reset_optimizer == (phase.name != "full")
        assert phase.freeze == (("teacher",) if epoch == 3 or phase.name == "kernel" else ())
        rng = np.random.default_rng(epoch)
        for task in shrinking.tasks(phase, rng, epoch, 0):
            phase.space.check(task.arch)
            if phase.name == "full":
                assert task.teacher is None
            else:
                assert task.teacher is not None and task.teacher.name == "teacher" and task.teacher_weight == 1.0
                assert task.teacher.arch.resolution == task.arch.resolution, "the teacher sees the student's input"
    assert seen == ["full"] * 3 + ["kernel"] * 2 + ["depth_1"] * 2 + ["depth_2"] * 2 + ["width_1"] + ["width_2"] * 2
    per_step = {name: len(shrinking.tasks(shrinking.phase(epoch), np.random.default_rng(0), epoch, 0)) for epoch, name in enumerate(seen)}
    assert per_step == {"full": 1, "kernel": 1, "depth_1": 2, "depth_2": 2, "width_1": 4, "width_2": 4}


def test_phases_that_unlock_nothing_are_left_out_and_lengths_follow_the_weights() -> None:
    narrow = WIDE_SPACE.replace("depth: [1, 2, 3]", "depth: [1, 2]").replace("kernel_size: [3, 5, 7]", "kernel_size: 3")
    schedule = Schedule(lr=0.1, epochs=10, warmup_epochs=0, steps_per_epoch=2)
    plan = ProgressiveShrinking(space(narrow), ProgressiveShrinkingOptions(), schedule).plan
    assert [p.name for p in plan] == ["full", "depth_1", "width_1", "width_2"], "no kernel choices; two depths need one depth step"
    assert sum(p.epochs for p in plan) == 10
    assert allocate_epochs([180, 120, 25, 120, 25, 120], 590 + 6) == [181, 121, 26, 121, 26, 121]
    assert allocate_epochs([1, 1, 1], 3) == [1, 1, 1]
    assert allocate_epochs([3, 1], 10) == [7, 3]


def test_each_phase_decays_its_own_learning_rate_from_its_scale() -> None:
    shrinking = strategy(epochs=12)
    for planned in shrinking.plan:
        first = shrinking.learning_rate(planned.start, 0)
        peak = 0.1 * getattr(shrinking.options.phase_lr, planned.name)
        if planned.name == "full":
            assert first == pytest.approx(peak / 4), "the run's warm-up applies to the first phase"
        else:
            assert first == pytest.approx(peak)
        last = shrinking.learning_rate(planned.start + planned.epochs - 1, 3)
        assert 0 <= last < first


@pytest.mark.parametrize("text", [WIDE_SPACE, MIXED_SPACE], ids=["image", "sequence"])
def test_channel_reordering_keeps_the_largest_network_and_sorts_by_importance(text: str) -> None:
    search_space = space(text)
    for family in [choices.type for choices in search_space.stages[0].blocks]:
        torch.manual_seed(0)
        supernet = Supernet(search_space)
        randomise_batch_norm(supernet)
        # float64: a permutation changes the order of float32 sums (GLA's recurrence alone moves ~1e-5), so the
        # exactness of the reordering is checked where rounding cannot hide a wrong index.
        supernet.eval().double()
        arch = search_space.largest(family)
        supernet.set_active(arch)
        if search_space.modality == "image":
            x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        else:
            x = torch.randint(0, search_space.in_channels, (3, max(search_space.sequence_lengths)))
        with torch.no_grad():
            before = supernet(x)
        weights = {name: parameter.detach().clone() for name, parameter in supernet.named_parameters()}
        supernet.reorder_channels()
        with torch.no_grad():
            after = supernet(x)
        assert (after - before).abs().max().item() <= 1e-10, family
        assert any(not torch.equal(weights[name], parameter) for name, parameter in supernet.named_parameters()), "something was reordered"
    for module in supernet.modules():
        down = getattr(getattr(module, "ffn", None), "down", None)
        if down is not None:
            scores = down.weight.detach().abs().sum(0)
            assert torch.all(scores[:-1] >= scores[1:]), "hidden units sorted by importance"
            assert torch.equal(importance_order(down.weight, 1), torch.arange(scores.numel()))


def deps(epochs: int = 10, **options: object) -> DelayedShrinking:
    schedule = Schedule(lr=0.1, epochs=epochs, warmup_epochs=0, steps_per_epoch=10)
    return DelayedShrinking(space(), DepsOptions.model_validate(options), schedule)


def test_deps_trains_the_full_network_first_then_shrinks_everything_at_once() -> None:
    delayed = deps(epochs=10)
    assert [delayed.phase(epoch).name for epoch in range(10)] == ["full"] * 5 + ["shrink"] * 5
    full = delayed.phase(0)
    assert full.space.count() == 2, "the full network at every input size"
    assert delayed.phase(7).space == delayed.space
    tasks = delayed.tasks(delayed.phase(7), np.random.default_rng(0), 7, 0)
    assert tasks[0].arch == delayed.space.largest() and tasks[0].provides_teacher and tasks[0].lr_scale == 1
    assert tasks[1].arch == delayed.space.smallest() and len(tasks) == 4
    assert all(task.teacher is not None and task.teacher_weight == 1.0 and task.label_weight == 0 for task in tasks[1:])
    assert deps(epochs=10, full_fraction=0.3).phase(3).name == "shrink"


def test_deps_raises_subnet_learning_rates_step_by_step() -> None:
    delayed = deps(epochs=10, subnet_lr_start=0.2, subnet_lr_steps=4, subnet_lr_ramp=0.4)
    # shrink phase: epochs 5..9, 50 steps; the ramp covers the first 20 in 4 steps of 5.
    scales = [delayed.subnet_lr_scale(5 + step // 10, step % 10) for step in range(50)]
    assert scales[:5] == [0.2] * 5
    assert scales[5:10] == [pytest.approx(0.4)] * 5
    assert scales[15:20] == [pytest.approx(0.8)] * 5
    assert scales[20:] == [1.0] * 30
    assert all(a <= b for a, b in zip(scales, scales[1:], strict=False))
    tasks = delayed.tasks(delayed.phase(5), np.random.default_rng(0), 5, 0)
    assert [task.lr_scale for task in tasks] == [1.0, 0.2, 0.2, 0.2]


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ("{epochs: 3, strategy: progressive_shrinking}", r"training\.phase_epochs: 6 phases .* need at least 6 epochs, got training\.epochs 3"),
        (
            "{epochs: 8, strategy: progressive_shrinking, phase_epochs: {ful: 1}}",
            r"training\.phase_epochs\.ful: unknown key; allowed keys: \['depth_1', .*did you mean 'full'",
        ),
        ("{epochs: 8, strategy: progressive_shrinking, phase_lr: {full: 0}}", r"training\.phase_lr\.full: must be > 0"),
        (
            "{epochs: 4, strategy: progressive_shrinking, phase_epochs: {depth_1: 0}}",
            r"training\.phase_epochs: 5 phases \(full, kernel, depth_2, width_1, width_2\)",
        ),
        ("{epochs: 8, strategy: progressive_shrinking, phase_epochs: {full: 0}}", r"training\.phase_epochs\.full: must be > 0"),
        ("{epochs: 8, strategy: progressive_shrinking, subnets_per_step: {width: 0}}", r"training\.subnets_per_step\.width"),
        ("{epochs: 8, strategy: deps, full_fraction: 1.5}", r"training\.full_fraction"),
        ("{epochs: 1, strategy: deps}", r"training\.full_fraction: deps needs at least 2 epochs"),
        ("{epochs: 8, strategy: deps, subnet_lr_start: 0}", r"training\.subnet_lr_start"),
    ],
)
def test_options_are_validated_with_their_yaml_path(training: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(WIDE_SPACE + f"training: {training}\n")


def test_both_methods_are_registered() -> None:
    assert {"progressive_shrinking", "deps"} <= set(STRATEGIES.names())
