"""benchmarks/search_quality.py: the enumeration, the budgets, the hypervolume share on a made-up table computed by
hand, the MAC-ranking baseline, and the sampler driver's budget in distinct archs and its bound on asks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from nas.search.samplers import SAMPLERS
from nas.space.schema import load_config
from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


bench = load_benchmark("search_quality")


@pytest.fixture(scope="module")
def space() -> Any:
    return load_config("mqar_quick").space


def test_enumeration_lists_every_arch_once(space: Any) -> None:
    archs = bench.enumerate_archs(space)
    assert len(archs) == space.count() == len({arch.to_json() for arch in archs})
    assert space.largest() in archs and space.smallest() in archs
    with pytest.raises(ValueError, match="more than the 10"):
        bench.enumerate_archs(space, limit=10)


def test_budgets_are_rounded_fractions_of_the_space() -> None:
    assert bench.budgets_of(544, [0.01, 0.02, 0.05]) == [5, 11, 27]
    assert bench.budgets_of(10, [0.001, 1.0]) == [1, 10]


def test_hypervolume_share_on_a_made_up_table() -> None:
    table = bench.Table(("a", "b", "c", "d"), np.asarray([0.0, 1.0, 0.5, 0.25]), np.asarray([0.0, 1.0, 0.5, 0.75]), 0.1)
    assert table.front() == [0, 2, 1]
    assert table.hypervolume(range(4)) == pytest.approx(0.1 * 0.5 + 0.6 * 0.5 + 1.1 * 0.1)
    assert table.hypervolume([0, 1]) == pytest.approx(0.1 * 1.0 + 1.1 * 0.1)
    scaled = bench.Table(table.archs, 0.5 + 0.2 * table.accuracy, 3.0 + 7.0 * table.latency, 0.1)
    assert scaled.hypervolume([0, 1]) / scaled.hypervolume(range(4)) == pytest.approx(table.hypervolume([0, 1]) / table.hypervolume(range(4)))


def test_rank_by_macs_spreads_the_picks_over_the_ranking() -> None:
    assert bench.rank_by_macs([5, 1, 3, 2, 4], 3) == [1, 2, 0]
    assert bench.rank_by_macs([5, 1, 3, 2, 4], 5) == [1, 3, 2, 4, 0]


def fake_objective(space: Any) -> Any:
    rng = np.random.default_rng(0)
    table = {arch.to_json(): (float(rng.random()), float(rng.random())) for arch in bench.enumerate_archs(space)}
    return table.__getitem__


def test_sampler_run_counts_distinct_archs_anchors_first(space: Any) -> None:
    run = bench.run_sampler(space, fake_objective(space), "random", seed=0, budget=11, population_size=16)
    assert len(run.evaluated) == len(set(run.evaluated)) == 11
    assert run.evaluated[:2] == (space.largest().to_json(), space.smallest().to_json())
    assert run.asks == 11 + run.duplicates
    again = bench.run_sampler(space, fake_objective(space), "random", seed=0, budget=11, population_size=16)
    assert again == run


class FirstChoiceSampler(optuna.samplers.BaseSampler):
    """Always proposes the first choice of every parameter: after one arch, only repeats."""

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        choices: Sequence[Any] = param_distribution.choices
        return choices[0]


def test_a_sampler_stuck_on_repeats_ends_at_the_ask_bound(space: Any) -> None:
    SAMPLERS.register("first_choice_for_test", lambda options: FirstChoiceSampler(), description="test only")
    try:
        run = bench.run_sampler(space, fake_objective(space), "first_choice_for_test", seed=0, budget=5, population_size=4, anchors=False)
    finally:
        SAMPLERS.unregister("first_choice_for_test")
    assert len(run.evaluated) == 1
    assert run.asks == bench.MAX_ASKS_PER_TRIAL * 5
    assert run.duplicates == run.asks - 1
