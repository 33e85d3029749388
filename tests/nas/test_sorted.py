"""The sorted strategy (SortedNet): the nested family along one size knob, its training steps, and
``nas export RUN --sorted`` (every member as a checked ONNX file, with ``sorted.json`` and ``report.md``)."""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from nas import jsonio
from nas.cli import main
from nas.export.onnx import read_arch
from nas.export.sorted import REPORT_FILE, SUMMARY_FILE
from nas.run_dir import SORTED_DIR
from nas.space.schema import ConfigError, parse_config
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.strategies import INPLACE, STRATEGIES, Schedule, StrategyError
from nas.supernets.strategies.sorted import SortedNet, SortedOptions, arch_parameters, is_numeric, sorted_arch, sorted_family, sorted_members
from nas.supernets.supernet import Supernet
from nas.training.loop import train_step
from tests.helpers import TINY_DIGITS_SPACE

SORTED_DIGITS_SPACE = """\
name: tiny_sorted
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, kernel_size: 3, stride: 1, activation: relu}
stages:
  - depth: [1, 2, 3]
    width: [8, 12, 16]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 3], activation: relu, squeeze_excite: [false, true]}
head: {channels: [32]}
resolution: [6, 8]
"""
"""A one-stage MBConv space on 8x8 digits whose depth and width have three choices: a family of 5 has 4 members."""

SORTED_TRAINING = """\
training: {strategy: sorted, family_size: 5, subnets_per_step: 2, epochs: 1, batch_size: 256, lr: 0.02, calibration_batches: 1, augment: false}
search: {measure_seconds: 0.05}
"""
"""One epoch of 4 steps, one calibration batch, and 0.05 s of latency measurement per member: seconds, not minutes."""

MQAR_SPACE = """\
name: tiny_mqar
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
"""A sequence space whose positions choose gated attention or GLA (the family takes the first-listed type)."""


def space_of(text: str) -> SearchSpace:
    return parse_config(text).space


def schedule() -> Schedule:
    return Schedule(lr=0.01, epochs=2, warmup_epochs=0, steps_per_epoch=4)


def assert_nested(space: SearchSpace, smaller: Arch, larger: Arch) -> None:
    """Every decision of ``smaller`` is active in ``larger`` with a value at least as large (numeric) or the same
    largest choice (names, booleans, block types)."""
    walk = space.walk()
    small, large = walk.values(smaller), walk.values(larger)
    for name, value in small.items():
        decision = walk.by_name[name]
        assert name in large, f"{name} is active in {smaller.short_name()} but not in {larger.short_name()}"
        if is_numeric(decision):
            assert value <= large[name], f"{name}: {value} > {large[name]}"
        else:
            assert value == large[name] == decision.largest, name


@pytest.mark.parametrize("text", [TINY_DIGITS_SPACE, SORTED_DIGITS_SPACE, MQAR_SPACE], ids=["tiny_digits", "digits", "mqar"])
@pytest.mark.parametrize("family_size", [2, 5, 8, 256])
def test_the_family_is_nested_strictly_growing_and_spans_the_space(text: str, family_size: int) -> None:
    space = space_of(text)
    members = sorted_members(space, family_size)
    family = sorted_family(space, family_size)
    assert family == [member.arch for member in members]
    assert 2 <= len(family) <= family_size
    assert family[-1] == space.largest()
    params = [arch_parameters(space, arch) for arch in family]
    assert params == [member.params for member in members]
    assert all(a < b for a, b in zip(params, params[1:], strict=False)), params
    for smaller, larger in zip(family, family[1:], strict=False):
        space.check(smaller)
        assert_nested(space, smaller, larger)
    walk = space.walk()
    first = walk.values(family[0])
    assert members[0].t == 0
    assert all(value == min(walk.by_name[name].choices) for name, value in first.items() if is_numeric(walk.by_name[name]))
    assert [member.t for member in members] == sorted({member.t for member in members})


def test_the_knob_takes_index_round_t_of_every_sorted_numeric_choice() -> None:
    space = space_of(SORTED_DIGITS_SPACE.replace("width: [8, 12, 16]", "width: [16, 8, 12]"))
    half = sorted_arch(space, 0.5)
    assert (half.resolution, half.stages[0].width, len(half.stages[0].blocks)) == (8, 12, 2)
    assert all(block.kernel_size == 5 and block.expand_ratio == 3 and block.squeeze_excite is True for block in half.stages[0].blocks)
    quarter = sorted_arch(space, 0.25)
    assert (quarter.resolution, quarter.stages[0].width, len(quarter.stages[0].blocks)) == (6, 12, 2)
    assert sorted_arch(space, 1) == space.largest()
    family = [member.arch for member in sorted_members(space, 5)]
    assert [arch.short_name().split("_")[:2] for arch in family] == [["r6", "w8d1"], ["r6", "w12d2"], ["r8", "w12d2"], ["r8", "w16d3"]]
    mqar = [member.arch for member in sorted_members(space_of(MQAR_SPACE), 8)]
    assert {type(block).__name__ for arch in mqar for block in arch.stages[0].blocks} == {type(space_of(MQAR_SPACE).largest().stages[0].blocks[0]).__name__}
    assert [arch.sequence_length for arch in mqar] == [16, 24, 24, 32]
    sizes = space_of(TINY_DIGITS_SPACE.replace("resolution: [6, 8]", "resolution: [4, 6, 8]"))
    members = sorted_members(sizes, 5)
    assert [(member.t, member.arch.resolution) for member in members] == [(0, 4), (Fraction(3, 4), 8)]
    assert members[-1].arch == sizes.largest() and members[0].arch == sorted_arch(sizes, 0)
    with pytest.raises(StrategyError, match=re.escape("t must be in [0, 1], got 1.5")):
        sorted_arch(space, 1.5)


@pytest.mark.parametrize(
    "replacements",
    [
        {"depth: [1, 2]": "depth: 1", "width: [8, 12]": "width: 8", "kernel_size: [3, 5]": "kernel_size: 3", "expand_ratio: [2, 3]": "expand_ratio: 2"},
        {"depth: [1, 2]": "depth: 1", "width: [8, 12]": "width: 8", "kernel_size: [3, 5]": "kernel_size: 3", "expand_ratio: [2, 3]": "expand_ratio: 2"}
        | {"squeeze_excite: [false, true]": "squeeze_excite: true"},
    ],
    ids=["only_a_boolean_and_the_resolution", "only_the_resolution"],
)
def test_a_space_without_a_growing_numeric_choice_is_refused_with_the_rule(replacements: dict[str, str]) -> None:
    text = TINY_DIGITS_SPACE
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    space = space_of(text)
    assert space.count() > 1
    with pytest.raises(StrategyError, match=r"training\.family_size: .* gives only 1 distinct member.* needs at least 2"):
        sorted_members(space, 8)
    with pytest.raises(StrategyError, match="needs at least 2"):
        SortedNet(space, SortedOptions(), schedule())
    ((option, message),) = SortedNet.check_space(SortedOptions(), space, epochs=4)
    assert option == "family_size" and message.startswith(f"the space {space.name!r} gives only 1 distinct member")
    assert SortedNet.check_space(SortedOptions(), space_of(SORTED_DIGITS_SPACE), epochs=4) == []
    with pytest.raises(ConfigError, match=r"training\.family_size: the space .* gives only 1 distinct member"):
        parse_config(text + "training: {strategy: sorted}\n")


@pytest.mark.parametrize(
    ("training", "where", "message"),
    [
        ("{strategy: sorted, family_size: 4, subnets_per_step: 5}", "training.subnets_per_step", "must be at most family_size (4), got 5"),
        ("{strategy: sorted, subnets_per_step: 1}", "training.subnets_per_step", "must be at least 2 with always_largest: true"),
        ("{strategy: sorted, distill: true, always_largest: false}", "training.distill", "needs always_largest: true"),
        ("{strategy: sorted, family_size: 1}", "training.family_size", "greater than or equal to 2"),
        ("{strategy: sorted, family_size: 257}", "training.family_size", "less than or equal to 256"),
        ("{strategy: sorted, family_sise: 4}", "training.family_sise", "did you mean 'family_size'?"),
        ("{strategy: sorted, random_subnets: 2}", "training.random_subnets", "unknown key for strategy 'sorted'"),
    ],
)
def test_options_are_validated_with_their_yaml_path(training: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(TINY_DIGITS_SPACE + f"training: {training}\n")
    problems = {problem.path: problem.message for problem in caught.value.problems}
    assert where in problems and message in problems[where], problems
    options = parse_config(TINY_DIGITS_SPACE + "training: {strategy: sorted, family_size: 16, distill: true}\n").training.strategy_options()
    assert options == SortedOptions(family_size=16, subnets_per_step=2, always_largest=True, distill=True)
    assert STRATEGIES.get("sorted") is SortedNet


def test_steps_draw_family_members_deterministically_largest_first() -> None:
    space = space_of(SORTED_DIGITS_SPACE)
    strategy = SortedNet(space, SortedOptions(family_size=5, subnets_per_step=3), schedule())
    family = strategy.family
    assert list(family) == sorted_family(space, 5) and len(family) == 4
    phase = strategy.phase(0)
    assert phase.name == "sorted" and phase.space == space and strategy.phase(1) == phase
    seen: set[Arch] = set()
    for seed in range(60):
        tasks = strategy.tasks(phase, np.random.default_rng(seed), 0, seed)
        assert tasks == strategy.tasks(phase, np.random.default_rng(seed), 0, seed)
        archs = [task.arch for task in tasks]
        assert len(archs) == len(set(archs)) == 3
        assert archs[0] == space.largest() and all(arch in family for arch in archs)
        assert [family.index(arch) for arch in archs] == sorted((family.index(arch) for arch in archs), reverse=True)
        assert all(task.teacher is None and task.label_weight == 1 and task.lr_scale == 1 for task in tasks)
        seen.update(archs)
    assert seen == set(family)
    free = SortedNet(space, SortedOptions(family_size=5, subnets_per_step=2, always_largest=False), schedule())
    draws = [free.tasks(phase, np.random.default_rng(seed), 0, 0) for seed in range(60)]
    assert any(space.largest() not in [task.arch for task in tasks] for tasks in draws)
    assert {task.arch for tasks in draws for task in tasks} == set(family)
    everything = SortedNet(space, SortedOptions(family_size=8, subnets_per_step=8), schedule())
    assert [task.arch for task in everything.tasks(phase, np.random.default_rng(0), 0, 0)] == list(everything.family[::-1])


def test_distillation_takes_the_largest_as_the_in_place_teacher() -> None:
    space = space_of(MQAR_SPACE)
    strategy = SortedNet(space, SortedOptions(family_size=8, subnets_per_step=3, distill=True), schedule())
    teacher, *students = strategy.tasks(strategy.phase(0), np.random.default_rng(3), 0, 0)
    assert teacher.arch == space.largest() and teacher.provides_teacher and teacher.label_weight == 1
    assert len(students) == 2
    assert all(task.teacher is INPLACE and task.label_weight == 0 and task.teacher_weight == 1 and task.lr_scale == 1 for task in students)


@pytest.mark.parametrize("distill", [False, True])
def test_one_step_makes_one_optimizer_update(distill: bool) -> None:
    space = space_of(SORTED_DIGITS_SPACE)
    strategy = SortedNet(space, SortedOptions(family_size=5, subnets_per_step=3, distill=distill), schedule())
    supernet = Supernet(space)
    optimizer = torch.optim.SGD(supernet.parameters(), lr=0.1)
    updates: list[int] = []
    optimizer.register_step_post_hook(lambda *_: updates.append(1))
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    before = {name: value.clone() for name, value in supernet.state_dict().items()}
    rng = np.random.default_rng(0)
    for step in range(2):
        tasks = strategy.tasks(strategy.phase(0), rng, 0, step)
        loss, _, count = train_step(supernet, tasks, inputs, targets, optimizer=optimizer, lr=0.1)
        assert np.isfinite(loss) and count == 8
        assert len(updates) == step + 1
    assert any(not torch.equal(before[name], value) for name, value in supernet.state_dict().items())


def run_nas(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_export_sorted_writes_every_member_checked_with_its_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SORTED_DIGITS_SPACE + SORTED_TRAINING)
    sorted_run = tmp_path / "run"
    assert main(["train", str(space_file), "--out", str(sorted_run)]) == 0
    assert "phase=sorted" in capsys.readouterr().err
    code = main(["export", str(sorted_run), "--sorted"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "sorted export" in err
    space = space_of(SORTED_DIGITS_SPACE + SORTED_TRAINING)
    family = sorted_family(space, 5)
    root = sorted_run / SORTED_DIR
    summary = jsonio.loads((root / SUMMARY_FILE).read_text())
    members = summary["members"]
    assert summary["strategy"] == "sorted" and summary["family_size"] == 5 and summary["members_count"] == len(members) == len(family) == 4
    assert summary["folder"] == SORTED_DIR
    assert [Arch.from_dict(member["arch"], space) for member in members] == family
    assert [member["t"] for member in members] == [0.0, 0.25, 0.5, 0.75]
    params = [member["params"] for member in members]
    assert all(a < b for a, b in zip(params, params[1:], strict=False)), params
    assert all(a < b for a, b in zip([m["macs"] for m in members], [m["macs"] for m in members][1:], strict=False))
    for member, arch in zip(members, family, strict=True):
        folder = root / member["folder"]
        assert member["arch_name"] == arch.short_name() and folder.name.endswith(arch.short_name())
        assert read_arch(folder / "model.onnx", space) == arch
        export = jsonio.loads((folder / "export.json").read_text())
        assert export["onnx_max_abs_error"] <= 1e-4 and export["onnx_max_abs_error"] == member["onnx_max_abs_error"]
        assert export["test_accuracy"] == member["onnx_test_accuracy"]
        assert abs(member["onnx_test_accuracy"] - member["inherited_test_accuracy"]) <= 0.02
        for key in ("inherited_val_accuracy", "inherited_test_accuracy", "onnx_val_accuracy", "onnx_test_accuracy"):
            assert 0 <= member[key] <= 1, key
        latency = member["latency_ms"]
        assert latency["median_ms"] > 0 and latency["samples"] >= 1 and latency["fingerprint"]["precision"] == "fp32"
        assert member["int8"] is None and member["int8_error"] is None
        largest = members[-1]["onnx_test_accuracy"]
        assert member["share_of_largest"] == pytest.approx(member["onnx_test_accuracy"] / largest)
    shares = [member["share_of_largest"] for member in members]
    assert shares[-1] == 1.0
    assert summary["mean_share_of_largest"] == pytest.approx(sum(shares) / 4)
    assert summary["mean_share_of_smaller"] == pytest.approx(sum(shares[:3]) / 3)
    assert summary["latency"]["target"] == "cpu_fp32" and summary["latency"]["measure_seconds_per_member"] == 0.05
    report = (root / REPORT_FILE).read_text()
    assert all(f"`{arch.short_name()}`" in report for arch in family)
    assert "Family mean share of the largest member's accuracy" in report and "## How latency was measured" in report
    assert f"wrote 4 members to {root}" in out
    assert sorted(path.name for path in root.iterdir()) == sorted([member["folder"] for member in members] + [SUMMARY_FILE, REPORT_FILE])

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", str(sorted_run), "--sorted", "--out", str(foreign)]) == 2
    assert "holds files that are not a sorted export's" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_export_sorted_refuses_a_run_of_another_strategy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "sandwich.yaml"
    space.write_text(TINY_DIGITS_SPACE + "training: {strategy: sandwich, epochs: 1, batch_size: 512, random_subnets: 0, calibration_batches: 1}\n")
    assert main(["train", str(space), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    result = run_nas("export", str(tmp_path / "run"), "--sorted")
    assert result.returncode == 2, result.stderr
    err = result.stderr
    assert err.startswith(f"error: {tmp_path / 'run'} was trained with strategy 'sandwich'; ") and "Traceback" not in err
    assert "needs a run trained with the sorted strategy (`training: {strategy: sorted}`" in err
    assert not (tmp_path / "run" / SORTED_DIR).exists()
