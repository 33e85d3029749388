"""benchmarks/ranking_fidelity.py: the statistics on cases computed by hand, the stratified sample, the step count,
and the ``--quick`` setting end to end (output structure, caching, resumption), never absolute times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nas.supernets.strategies import STRATEGIES
from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


bench = load_benchmark("ranking_fidelity")


def test_perfect_and_reversed_rankings() -> None:
    values = [0.1, 0.4, 0.2, 0.9, 0.5, 0.7]
    perfect = bench.ranking_statistics(values, [2 * value + 1 for value in values])
    assert perfect["kendall_tau"] == pytest.approx(1.0)
    assert perfect["spearman_rho"] == pytest.approx(1.0)
    assert perfect["kendall_tau_ci95"] == pytest.approx((1.0, 1.0))
    assert perfect["top_k_overlap"] == perfect["top_k"] == 5
    reversed_ = bench.ranking_statistics(values, [-value for value in values])
    assert reversed_["kendall_tau"] == pytest.approx(-1.0)
    assert reversed_["spearman_rho"] == pytest.approx(-1.0)
    assert reversed_["kendall_tau_ci95"] == pytest.approx((-1.0, -1.0))


def test_statistics_of_a_case_computed_by_hand() -> None:
    # (1, 2, 3, 4) against (1, 3, 2, 4): 6 pairs, one discordant -> tau = (5 - 1) / 6; rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    row = bench.ranking_statistics([1, 2, 3, 4], [1, 3, 2, 4])
    assert row["kendall_tau"] == pytest.approx(4 / 6)
    assert row["spearman_rho"] == pytest.approx(0.8)
    low, high = row["kendall_tau_ci95"]
    assert -1 <= low <= row["kendall_tau"] <= high <= 1
    assert row["top_k"] == 4 and row["top_k_overlap"] == 4
    assert bench.top_overlap([5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], k=2) == 0
    assert bench.top_overlap([5, 4, 3, 2, 1, 0], [4, 5, 0, 3, 1, 2], k=3) == 2
    assert bench.kendall([1, 1, 1], [1, 2, 3]) is None


def test_vectorised_tau_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(1)
    first = rng.integers(0, 5, size=(50, 12)).astype(float)
    second = first + rng.integers(-2, 3, size=(50, 12))
    first[0] = 3.0
    expected = [bench.kendall(a, b) for a, b in zip(first, second, strict=True)]
    computed = bench.kendall_tau_b_rows(first, second)
    assert np.isnan(computed[0]) and expected[0] is None
    assert computed[1:] == pytest.approx(expected[1:])


def test_bootstrap_interval_brackets_a_noisy_estimate() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=40)
    noisy = truth + rng.normal(scale=0.7, size=40)
    tau = bench.kendall(noisy, truth)
    low, high = bench.bootstrap_interval(noisy, truth)
    assert 0 < low < tau < high < 1
    assert bench.bootstrap_interval(noisy, truth) == (low, high)


def test_stratified_sample_spans_the_macs_range() -> None:
    setting = bench.SETTINGS["quick"][0]
    config = bench.config_for(setting)
    archs = bench.stratified_sample(config.space, 6, 40, seed=0)
    assert archs == bench.stratified_sample(config.space, 6, 40, seed=0)
    assert len(set(archs)) == 6
    assert archs[0] == config.space.smallest() and archs[-1] == config.space.largest()
    macs = [bench.ArchCosts.for_space(config.space).cost(arch)[1] for arch in archs]
    assert macs == sorted(macs)


def test_sandwich_step_count() -> None:
    setting = bench.SETTINGS["quick"][1]
    config = bench.config_for(
        bench.TaskSetting(setting.name, bench.merged(setting.space, {"training": {"epochs": 3}}), 2, 4),
        "sandwich",
        {"largest_only_epochs": 1, "random_subnets": 3},
    )
    counted = bench.count_steps(config, steps_per_epoch=7)
    assert counted["phases"] == ["largest_only", "sandwich", "sandwich"]
    assert counted["optimizer_steps"] == 3 * 7
    assert counted["subnet_passes"] == 7 * 1 + 2 * 7 * (2 + 3)


def test_a_cache_shared_by_two_writers_keeps_both_entries(tmp_path: Path) -> None:
    first, second = bench.JsonCache(tmp_path / "cache.json"), bench.JsonCache(tmp_path / "cache.json")
    first.put("a", 1)
    second.put("b", 2)
    assert bench.JsonCache(tmp_path / "cache.json").entries == {"a": 1, "b": 2}
    assert first.get("b") == 2


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ranking_fidelity")
    threads = torch.get_num_threads()
    results = bench.main(["--quick", "--methods", "sandwich", "--out", str(out)])
    assert torch.get_num_threads() == threads
    return out, results


def test_quick_run_writes_the_table_and_strict_json(quick_run: tuple[Path, dict]) -> None:
    out, results = quick_run
    written = json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert written["setting"] == "quick" and written["date"] and written["machine"]["cpu_model"]
    assert [task["task"] for task in written["tasks"]] == ["digits", "mqar"]
    table = (out / "results.md").read_text()
    for task in written["tasks"]:
        assert task["subnets"] == len(task["archs"]) == 6
        assert len({json.dumps(item["arch"], sort_keys=True) for item in task["archs"]}) == 6
        assert set(task["baselines"]) == {"macs", "params", "noise_ceiling"}
        assert set(task["methods"]) == {"sandwich"}
        for row in [*task["baselines"].values(), *task["methods"].values()]:
            if row["kendall_tau"] is not None:
                low, high = row["kendall_tau_ci95"]
                assert -1 <= low <= row["kendall_tau"] <= high <= 1
        sandwich = task["methods"]["sandwich"]
        reference = np.mean([item["standalone"] for item in task["archs"]], axis=1)
        assert sandwich["kendall_tau"] == pytest.approx(bench.kendall(sandwich["inherited"], reference))
        assert sandwich["mean_absolute_gap_points"] == pytest.approx(100 * np.mean(np.abs(np.asarray(sandwich["inherited"]) - reference)))
        macs = [item["macs"] for item in task["archs"]]
        assert task["baselines"]["macs"]["kendall_tau"] == pytest.approx(bench.kendall(macs, reference))
        assert macs == sorted(macs) and macs[0] < macs[-1]
        assert sandwich["optimizer_steps"] >= 1 and sandwich["subnet_passes"] >= sandwich["optimizer_steps"]
        assert 0 <= sandwich["largest_inherited"] <= 1 and task["standalone"]["spread_points"] >= 0
        assert f"## {task['task']}:" in table
    assert "| sandwich (inherited) |" in table and "| noise ceiling" in table and "| MACs only |" in table


def test_quick_run_resumes_from_its_caches(quick_run: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    out, results = quick_run

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached result was computed again")

    monkeypatch.setattr(bench, "train_standalone", refuse)
    monkeypatch.setattr(bench, "run_method", refuse)
    monkeypatch.setattr(bench, "stratified_sample", refuse)
    again = bench.main(["--quick", "--methods", "sandwich", "--out", str(out)])
    assert [task["methods"] for task in again["tasks"]] == [task["methods"] for task in results["tasks"]]
    assert [task["baselines"] for task in again["tasks"]] == [task["baselines"] for task in results["tasks"]]


def test_unknown_method_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    assert "sandwich" in STRATEGIES.names()
    with pytest.raises(KeyError, match="sandwich"):
        bench.main(["--quick", "--methods", "sandwhich", "--out", str(tmp_path)])
