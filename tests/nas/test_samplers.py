"""The search samplers: one contract over every sampler (same seed, same proposals; constraints recorded and honoured),
then the regularized evolution's own promises (children differ from parents, beats random, avoids infeasibility)."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from nas.search.samplers import (
    PARENTS_KEY,
    SAMPLERS,
    ConstraintRecordingSampler,
    RegularizedEvolutionSampler,
    make_sampler,
)

MIXED_CHOICES: dict[str, tuple[Any, ...]] = {
    "kernel_size": (3, 5, 7),
    "expand_ratio": (2.0, 3.0, 4.0, 6.0),
    "depth": (1, 2, 3, 4),
    "width": (8, 12, 16),
    "activation": ("relu", "hswish", "gelu"),
    "squeeze_excite": (False, True),
    "resolution": (96, 128, 160, 192),
    "attention": ("none", "gla"),
}
THREE_DIRECTIONS = ["maximize", "minimize", "minimize"]
INTEGER_CHOICES = tuple(range(1, 9))
INTEGER_PARAMETERS = tuple(f"choice_{index}" for index in range(10))


def mixed_objective(trial: optuna.Trial) -> tuple[float, float, float]:
    """Accuracy-like, latency-like and memory-like figures computed from the choices' indices only."""
    index = {
        name: choices.index(trial.suggest_categorical(name, list(choices))) for name, choices in MIXED_CHOICES.items()
    }
    accuracy = sum(index.values()) + 0.5 * index["activation"]
    latency = index["depth"] * (index["width"] + 1) + index["resolution"] + 2 * index["attention"]
    memory = index["expand_ratio"] + index["kernel_size"] * index["squeeze_excite"]
    return float(accuracy), float(latency), float(memory)


def mixed_constraints(trial: FrozenTrial) -> list[float]:
    """Feasible only with depth <= 2 and resolution <= 128: about a quarter of the space."""
    return [float(trial.params["depth"] - 2), float(trial.params["resolution"] - 128)]


def integer_objective(trial: optuna.Trial) -> tuple[float, float]:
    """Maximize the sum of the chosen integers (optimum 80); minimize a second objective that involves only two of
    them and is only weakly correlated with the sum."""
    values = [trial.suggest_categorical(name, list(INTEGER_CHOICES)) for name in INTEGER_PARAMETERS]
    return float(sum(values)), float((values[0] - 4) ** 2 + (values[1] - 5) ** 2)


def integer_constraints(trial: FrozenTrial) -> list[float]:
    """Infeasible when the first three integers sum above 13.5: half of the space."""
    return [sum(trial.params[name] for name in INTEGER_PARAMETERS[:3]) - 13.5]


def run_study(
    sampler: optuna.samplers.BaseSampler,
    objective: Callable[[optuna.Trial], Sequence[float]],
    directions: list[str],
    trials: int,
) -> optuna.Study:
    study = optuna.create_study(directions=directions, sampler=sampler)
    study.optimize(objective, n_trials=trials)
    return study


def proposals(study: optuna.Study) -> list[dict[str, Any]]:
    return [trial.params for trial in study.trials]


def violation(trial: FrozenTrial) -> float:
    return sum(value for value in trial.constraints.values() if value > 0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_proposals_and_different_seeds_differ(name: str) -> None:
    def sampled(seed: int) -> list[dict[str, Any]]:
        sampler = make_sampler(name, seed=seed, population_size=8)
        return proposals(run_study(sampler, mixed_objective, THREE_DIRECTIONS, 30))

    first = sampled(0)
    assert first == sampled(0)
    assert first != sampled(1)
    for params in first:
        assert set(params) == set(MIXED_CHOICES)
        for parameter, value in params.items():
            assert value in MIXED_CHOICES[parameter]


@pytest.mark.parametrize("name", SAMPLERS)
def test_constraints_are_recorded_and_best_trials_are_feasible(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = make_sampler(name, seed=0, constraints_func=mixed_constraints, population_size=8)
    study = run_study(sampler, mixed_objective, THREE_DIRECTIONS, 30)

    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 30
    for trial in complete:
        assert trial.system_attrs["constraints"] == tuple(mixed_constraints(trial))
    feasible = [trial for trial in complete if violation(trial) == 0]
    assert feasible, "the toy problem should have feasible trials"
    assert len(feasible) < len(complete), "the toy problem should have infeasible trials"

    best = study.best_trials
    assert best
    assert all(violation(trial) == 0 for trial in best)
    signs = [1.0 if direction == "minimize" else -1.0 for direction in THREE_DIRECTIONS]

    def dominates(first: FrozenTrial, second: FrozenTrial) -> bool:
        first_values = [sign * value for sign, value in zip(signs, first.values, strict=True)]
        second_values = [sign * value for sign, value in zip(signs, second.values, strict=True)]
        return all(a <= b for a, b in zip(first_values, second_values, strict=True)) and first_values != second_values

    expected = {trial.number for trial in feasible if not any(dominates(other, trial) for other in feasible)}
    assert {trial.number for trial in best} == expected


def test_random_without_constraints_is_a_plain_random_sampler() -> None:
    assert isinstance(make_sampler("random", seed=0), optuna.samplers.RandomSampler)
    wrapped = make_sampler("random", seed=0, constraints_func=mixed_constraints)
    assert isinstance(wrapped, ConstraintRecordingSampler)
    assert isinstance(wrapped.sampler, optuna.samplers.RandomSampler)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("nsga", "'nsga2'"), ("tpee", "'tpe'"), ("evolutoin", "'evolution'"), ("Random", "'random'")],
)
def test_unknown_sampler_name_gets_a_did_you_mean(name: str, hint: str) -> None:
    with pytest.raises(ValueError, match="sampler must be one of") as error:
        make_sampler(name, seed=0)
    message = str(error.value)
    assert f"did you mean {hint}?" in message
    assert repr(name) in message
    assert all(repr(allowed) in message for allowed in SAMPLERS)


def test_unknown_sampler_name_without_close_match() -> None:
    with pytest.raises(ValueError, match="got 'bayesian'") as error:
        make_sampler("bayesian", seed=0)
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"population_size": 1}, "population_size must be an integer >= 2, got 1"),
        (
            {"population_size": 8, "tournament_size": 9},
            r"tournament_size must be an integer in \[1, population_size=8\], got 9",
        ),
        ({"crossover_probability": 1.5}, r"crossover_probability must be in \[0, 1\], got 1.5"),
        ({"mutation_probability": -0.1}, r"mutation_probability must be in \[0, 1\] or None, got -0.1"),
        ({"seed": -1}, "seed must be a non-negative integer or None, got -1"),
    ],
)
def test_evolution_rejects_bad_settings(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RegularizedEvolutionSampler(**arguments)


def test_evolution_default_tournament_size() -> None:
    assert RegularizedEvolutionSampler(population_size=16).tournament_size == 4
    assert RegularizedEvolutionSampler(population_size=5).tournament_size == 2
    assert RegularizedEvolutionSampler(population_size=2).tournament_size == 2


def test_make_sampler_rejects_small_population() -> None:
    with pytest.raises(ValueError, match="population_size must be an integer >= 2, got 1"):
        make_sampler("nsga2", seed=0, population_size=1)


def test_evolution_children_differ_from_parents_and_stay_in_choices() -> None:
    population_size = 8
    sampler = RegularizedEvolutionSampler(population_size=population_size, seed=0)
    study = run_study(sampler, mixed_objective, THREE_DIRECTIONS, 80)
    trials = study.trials

    assert all(PARENTS_KEY not in trial.system_attrs for trial in trials[:population_size])
    children = trials[population_size:]
    assert all(PARENTS_KEY in trial.system_attrs for trial in children)
    crossed = 0
    for child in children:
        parents = child.system_attrs[PARENTS_KEY]
        assert 1 <= len(parents) <= 2
        crossed += len(parents) == 2
        for parent in parents:
            assert parent < child.number
            assert child.params != trials[parent].params
        for parameter, value in child.params.items():
            assert value in MIXED_CHOICES[parameter]
            assert type(value) is type(MIXED_CHOICES[parameter][0])
    assert 0 < crossed < len(children)


def test_evolution_population_ages() -> None:
    population_size = 8
    sampler = RegularizedEvolutionSampler(population_size=population_size, seed=1, crossover_probability=1.0)
    study = run_study(sampler, mixed_objective, THREE_DIRECTIONS, 60)
    for child in study.trials[population_size:]:
        for parent in child.system_attrs[PARENTS_KEY]:
            assert child.number - population_size <= parent < child.number


def test_evolution_proposals_are_a_function_of_seed_and_history() -> None:
    original = run_study(
        RegularizedEvolutionSampler(population_size=8, seed=3), mixed_objective, THREE_DIRECTIONS, 40
    )
    replayed = optuna.create_study(
        directions=THREE_DIRECTIONS, sampler=RegularizedEvolutionSampler(population_size=8, seed=3)
    )
    for trial in original.trials[:30]:
        replayed.add_trial(
            optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, values=trial.values)
        )
    replayed.optimize(mixed_objective, n_trials=10)
    assert proposals(replayed)[30:] == proposals(original)[30:]


def test_evolution_samples_non_categorical_parameters_at_random(caplog: pytest.LogCaptureFixture) -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        depth = trial.suggest_categorical("depth", [1, 2, 3, 4])
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        return float(depth), learning_rate

    with caplog.at_level("WARNING", logger="nas.search.samplers"):
        study = run_study(
            RegularizedEvolutionSampler(population_size=4, seed=0), objective, ["maximize", "minimize"], 20
        )
    assert all(1e-4 <= trial.params["learning_rate"] <= 1e-1 for trial in study.trials)
    assert len({trial.params["learning_rate"] for trial in study.trials}) == 20
    assert sum("'learning_rate'" in record.getMessage() for record in caplog.records) == 1


def test_evolution_beats_random_search() -> None:
    trials = 150

    def best_sum(name: str, seed: int) -> float:
        study = run_study(
            make_sampler(name, seed=seed, population_size=16), integer_objective, ["maximize", "minimize"], trials
        )
        return max(trial.values[0] for trial in study.trials)

    seeds = range(5)
    evolution = [best_sum("evolution", seed) for seed in seeds]
    random = [best_sum("random", seed) for seed in seeds]
    assert statistics.median(evolution) > statistics.median(random), (evolution, random)
    assert sum(best > statistics.median(random) for best in evolution) >= 3, (evolution, random)


def test_evolution_stops_sampling_infeasible_regions() -> None:
    population_size = 16
    startup_infeasible, startup_total, children_infeasible, children_total = 0, 0, 0, 0
    for seed in range(3):
        sampler = make_sampler(
            "evolution", seed=seed, constraints_func=integer_constraints, population_size=population_size
        )
        study = run_study(sampler, integer_objective, ["maximize", "minimize"], 100)
        infeasible = [violation(trial) > 0 for trial in study.trials]
        startup_infeasible += sum(infeasible[:population_size])
        startup_total += population_size
        children_infeasible += sum(infeasible[population_size:])
        children_total += len(infeasible) - population_size
    startup_fraction = startup_infeasible / startup_total
    children_fraction = children_infeasible / children_total
    assert startup_fraction > 0.3
    assert children_fraction < startup_fraction / 2, (startup_fraction, children_fraction)
    assert all(violation(trial) == 0 for trial in study.best_trials)


def test_evolution_without_constraints_func_reads_set_constraint() -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        values = integer_objective(trial)
        trial.set_constraint("first_three", integer_constraints(trial)[0])
        return values

    sampler = RegularizedEvolutionSampler(population_size=16, seed=0)
    study = run_study(sampler, objective, ["maximize", "minimize"], 100)
    infeasible = [violation(trial) > 0 for trial in study.trials]
    assert sum(infeasible[16:]) / len(infeasible[16:]) < sum(infeasible[:16]) / 16 / 2


def test_constraint_recording_sampler_delegates() -> None:
    inner = optuna.samplers.RandomSampler(seed=5)
    wrapped = ConstraintRecordingSampler(optuna.samplers.RandomSampler(seed=5), mixed_constraints)
    plain = run_study(inner, mixed_objective, THREE_DIRECTIONS, 10)
    recorded = run_study(wrapped, mixed_objective, THREE_DIRECTIONS, 10)
    assert proposals(plain) == proposals(recorded)
    assert all("constraints" not in trial.system_attrs for trial in plain.trials)
    assert all("constraints" in trial.system_attrs for trial in recorded.trials)
    assert str(wrapped) == "ConstraintRecordingSampler(RandomSampler)"


@pytest.mark.parametrize("crossover_probability", [0.0, 1.0])
def test_evolution_keeps_choice_types_in_a_tiny_space(crossover_probability: float) -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        squeeze_excite = trial.suggest_categorical("squeeze_excite", [False, True])
        depth = trial.suggest_categorical("depth", [1, 2])
        return float(squeeze_excite) + depth, float(depth)

    sampler = RegularizedEvolutionSampler(population_size=2, seed=0, crossover_probability=crossover_probability)
    study = run_study(sampler, objective, ["maximize", "minimize"], 20)
    assert all(type(trial.params["squeeze_excite"]) is bool for trial in study.trials)
    assert all(type(trial.params["depth"]) is int for trial in study.trials)
    for child in study.trials[2:]:
        parents = child.system_attrs[PARENTS_KEY]
        assert len(parents) == (2 if crossover_probability else 1)
        assert child.params != study.trials[parents[0]].params
