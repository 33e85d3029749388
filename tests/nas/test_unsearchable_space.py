"""A space that cannot be searched says so before any work: duplicate choices are refused wherever choices are
listed, a parameter or MAC limit below the smallest subnet is refused at validation with the space's minimum, and a
latency limit the smallest subnet misses when measured stops the search after its first batch."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from nas.run_dir import RunDir
from nas.search.loop import run_search
from nas.search.settings import SearchSettings, latency_key
from nas.search.study import distinct_trials
from nas.space.schema import ConfigError, parse_config
from nas.supernets.costs import arch_cost, space_minimum
from nas.supernets.elastic import count_parameters
from nas.supernets.supernet import build_static
from nas.training.loop import RunError, train
from tests.helpers import TINY_DIGITS_SPACE

TRAINING = "training: {epochs: 1, batch_size: 128, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 0}\n"
SEARCH = "search: {trials: 20, sampler: random, targets: [cpu_fp32], measure_seconds: 0.05}\n"
SPACE = TINY_DIGITS_SPACE + TRAINING + SEARCH

SEQUENCE_SPACE = """
name: tiny_sequence
task: {dataset: mqar, input_shape: [32], num_classes: 16, vocab_size: 16, num_kv_pairs: 2, num_train: 64, num_val: 32, num_test: 32}
stem: {channels: 16, kernel_size: 1}
stages:
  - depth: [1, 2]
    width: [16, 24]
    blocks:
      - {type: gla, num_heads: 1, key_dim: [8, 16], value_dim: 8, ffn: glu, mlp_ratio: 2, activation: gelu}
sequence_length: [16, 32]
"""


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return {problem.path: problem.message for problem in caught.value.problems}


def changed(text: str, change) -> str:
    data = yaml.safe_load(text)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def test_duplicate_input_sizes_are_refused_not_counted_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_config(TINY_DIGITS_SPACE).space.count() == 288
    duplicated = TINY_DIGITS_SPACE.replace("resolution: [6, 8]", "resolution: [8, 6, 8]")
    assert problems_of(duplicated) == {"resolution": "choices must be distinct, got [8, 6, 8]"}
    path = tmp_path / "space.yaml"
    path.write_text(duplicated)
    assert main(["validate", str(path)]) == 2
    assert "resolution: choices must be distinct, got [8, 6, 8]" in capsys.readouterr().err
    assert parse_config(SEQUENCE_SPACE).space.count() == 2 * 2 * (2 + 4)
    assert problems_of(SEQUENCE_SPACE.replace("sequence_length: [16, 32]", "sequence_length: [32, 32]")) == {
        "sequence_length": "choices must be distinct, got [32, 32]"
    }


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("stages[0].depth", lambda data: data["stages"][0].update(depth=[2, 2])),
        ("stages[0].width", lambda data: data["stages"][0].update(width=[8, 8])),
        ("stages[0].blocks[0].kernel_size", lambda data: data["stages"][0]["blocks"][0].update(kernel_size=[5, 5])),
        ("stages[0].blocks[0].expand_ratio", lambda data: data["stages"][0]["blocks"][0].update(expand_ratio=[2, 2.0])),
        ("stages[0].blocks[0].activation", lambda data: data["stages"][0]["blocks"][0].update(activation=["relu", "relu"])),
        ("stages[0].blocks[0].squeeze_excite", lambda data: data["stages"][0]["blocks"][0].update(squeeze_excite=[True, True])),
    ],
)
def test_duplicate_choices_are_refused_everywhere_choices_are_listed(where: str, change) -> None:
    found = problems_of(changed(TINY_DIGITS_SPACE, change))
    assert list(found) == [where] and found[where].startswith("choices must be distinct")


def test_head_channels_are_layers_not_choices() -> None:
    assert parse_config(TINY_DIGITS_SPACE.replace("head: {channels: [32]}", "head: {channels: [32, 32]}")).space.head.channels == (32, 32)


def test_a_parameter_limit_no_subnet_meets_is_refused_with_the_minimum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = parse_config(TINY_DIGITS_SPACE).space
    assert space_minimum(space, "params") == count_parameters(build_static(space, space.smallest())) == 1218
    text = TINY_DIGITS_SPACE + "search: {constraints: {params: 10}}\n"
    assert problems_of(text) == {"search.constraints.params": "10 is below the smallest subnet's 1,218 parameters: no subnet of the space can meet it"}
    path = tmp_path / "space.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    assert "search.constraints.params: 10 is below the smallest subnet's 1,218 parameters" in capsys.readouterr().err
    assert parse_config(TINY_DIGITS_SPACE + "search: {constraints: {params: 1218}}\n").search.constraints.params == 1218


def test_a_mac_limit_no_subnet_meets_is_refused_with_the_minimum() -> None:
    narrow = changed(
        TINY_DIGITS_SPACE,
        lambda data: (
            data["stages"][0].update(width=[8, 12], depth=[1]),
            data["stages"][0]["blocks"][0].update(kernel_size=3, expand_ratio=[2, 3], squeeze_excite=False),
            data.update(resolution=[6, 8]),
        ),
    )
    space = parse_config(narrow).space
    smallest_macs = arch_cost(space, space.smallest())[1]
    assert space_minimum(space, "macs") == smallest_macs
    data = yaml.safe_load(narrow)
    data["search"] = {"constraints": {"macs": 10, "params": 10}}
    found = problems_of(yaml.safe_dump(data))
    assert found == {
        "search.constraints.params": f"10 is below the smallest subnet's {space_minimum(space, 'params'):,} parameters: no subnet of the space can meet it",
        "search.constraints.macs": f"10 is below the smallest subnet's {smallest_macs:,} MACs (batch 1): no subnet of the space can meet it",
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unsearchable")
    train(parse_config(SPACE, "tiny.yaml"), folder / "run")
    return folder / "run"


def fresh_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def settings(**overrides) -> SearchSettings:
    return SearchSettings.from_config(parse_config(SPACE).search, **overrides)


def test_a_limit_set_in_python_below_the_smallest_subnet_stops_before_any_evaluation(trained: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(trained, tmp_path)
    with pytest.raises(RunError, match=r"search.constraints.params: 10 is below the smallest subnet's 1,218 parameters"):
        run_search(run_dir, dataclasses.replace(settings(), max_params=10))
    assert not RunDir(run_dir).search.exists(), "no study was opened"


def test_a_latency_limit_the_smallest_subnet_misses_stops_after_the_first_batch(trained: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(trained, tmp_path)
    impossible = dataclasses.replace(settings(), latency_limits=(("cpu_fp32", 1e-6),))
    with pytest.raises(RunError) as caught:
        run_search(run_dir, impossible)
    message = str(caught.value)
    from nas.search.study import load_study

    study = load_study(run_dir)
    trials = distinct_trials(study)
    assert 0 < len(trials) < impossible.trials, "stopped after the first batch, before spending the budget"
    space = parse_config(SPACE).space
    smallest = next(trial for trial in trials if trial.user_attrs["arch"] == space.smallest().to_json())
    median = smallest.user_attrs[latency_key("cpu_fp32")]["median_ms"]
    assert message.startswith(
        f"search.constraints.latency_ms.cpu_fp32: the smallest subnet ({space.smallest().short_name()}) measured {median:.4g} ms (median) on cpu_fp32, "
        "above the limit 1e-06 ms. No subnet is likely to meet it"
    )
    assert re.search(rf"stops after {len(trials)} arch\(s\) instead of spending its budget of 20", message)
    with pytest.raises(RunError, match="the smallest subnet .* measured"):
        run_search(run_dir, impossible, resume=True)
    assert len(distinct_trials(load_study(run_dir))) == len(trials), "the resumed search stops before evaluating anything"


def test_a_latency_limit_the_smallest_subnet_meets_lets_the_search_run(trained: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(trained, tmp_path)
    result = run_search(run_dir, dataclasses.replace(settings(trials=3), latency_limits=(("cpu_fp32", 1e4),)))
    assert result.evaluated == 3
