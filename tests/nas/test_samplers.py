"""The search samplers: one contract over every registered sampler (same seed, same proposals, on a flat and on a
conditional space; constraints honoured), the registry, then the regularized evolution's own promises (children differ
from parents, beats random, avoids infeasibility, walks a conditional space)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from nas.search.encoding import arch_from_params, suggest_arch
from nas.search.evolution import RegularizedEvolutionSampler
from nas.search.samplers import SAMPLERS, SamplerOptions, make_sampler
from nas.space.schema import parse_config
from nas.supernets.registry import DuplicateNameError

CONDITIONAL_SPACE = parse_config(
    """
name: conditional
task: {dataset: mqar, input_shape: [32], num_classes: 16, vocab_size: 16, num_kv_pairs: 2, num_train: 64, num_val: 16, num_test: 16}
stem: {channels: 16, kernel_size: 1}
stages:
  - depth: [1, 2, 3]
    width: [16, 24]
    blocks:
      - {type: gated_attention, num_heads: [1, 2], head_dim: [8, 16], ffn: glu, mlp_ratio: [1, 2], activation: gelu}
      - {type: gla, num_heads: [1, 2], key_dim: [8, 16], value_dim: 16, ffn: glu, mlp_ratio: [1, 2], activation: gelu}
sequence_length: [16, 32]
"""
).space
"""Two block types per position and a depth choice: a conditional parameter space."""

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
    index = {name: choices.index(trial.suggest_categorical(name, list(choices))) for name, choices in MIXED_CHOICES.items()}
    accuracy = sum(index.values()) + 0.5 * index["activation"]
    latency = index["depth"] * (index["width"] + 1) + index["resolution"] + 2 * index["attention"]
    memory = index["expand_ratio"] + index["kernel_size"] * index["squeeze_excite"]
    return float(accuracy), float(latency), float(memory)


def mixed_constraints(trial: FrozenTrial | optuna.Trial) -> list[float]:
    """Feasible only with depth <= 2 and resolution <= 128: about a quarter of the space."""
    return [float(trial.params["depth"] - 2), float(trial.params["resolution"] - 128)]


def constrained(objective: Callable[[optuna.Trial], Sequence[float]], constraints: Callable[[Any], list[float]]) -> Callable[[optuna.Trial], Sequence[float]]:
    """``objective`` that records ``constraints`` with ``Trial.set_constraint`` (how the search records them)."""

    def run(trial: optuna.Trial) -> Sequence[float]:
        values = objective(trial)
        for index, value in enumerate(constraints(trial)):
            trial.set_constraint(f"c{index}", value)
        return values

    return run


def conditional_objective(trial: optuna.Trial) -> tuple[float, float]:
    """Suggests an arch of ``CONDITIONAL_SPACE`` (define-by-run); a capacity-like and a size-like figure."""
    arch = suggest_arch(trial, CONDITIONAL_SPACE)
    blocks = arch.stages[0].blocks
    capacity = sum(getattr(config, "num_heads", 1) * getattr(config, "mlp_ratio", 1) for config in blocks) + (type(blocks[0]).__name__ == "GLAConfig")
    return float(capacity), float(arch.stages[0].width * len(blocks) + arch.sequence_length)


def integer_objective(trial: optuna.Trial) -> tuple[float, float]:
    """Maximize the sum of the chosen integers (optimum 80); minimize a second objective that involves only two of
    them and is only weakly correlated with the sum."""
    values = [trial.suggest_categorical(name, list(INTEGER_CHOICES)) for name in INTEGER_PARAMETERS]
    return float(sum(values)), float((values[0] - 4) ** 2 + (values[1] - 5) ** 2)


def integer_constraints(trial: FrozenTrial | optuna.Trial) -> list[float]:
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


@pytest.mark.parametrize("name", SAMPLERS.names())
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


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_walks_a_conditional_space_reproducibly(name: str) -> None:
    def sampled(seed: int) -> list[dict[str, Any]]:
        sampler = make_sampler(name, seed=seed, population_size=6, walk=CONDITIONAL_SPACE.walk())
        return proposals(run_study(sampler, conditional_objective, ["maximize", "minimize"], 30))

    first = sampled(0)
    assert first == sampled(0)
    assert first != sampled(1)
    walk = CONDITIONAL_SPACE.walk()
    for params in first:
        assert walk.params(arch_from_params(CONDITIONAL_SPACE, params)) == params, "only the arch's active decisions"


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_constraints_set_on_trials_keep_best_trials_feasible(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = make_sampler(name, seed=0, population_size=8)
    study = run_study(sampler, constrained(mixed_objective, mixed_constraints), THREE_DIRECTIONS, 30)

    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 30
    for trial in complete:
        assert list(trial.constraints.values()) == mixed_constraints(trial)
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


def test_registered_factories_make_the_documented_samplers() -> None:
    assert isinstance(make_sampler("random", seed=0), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler("nsga2", seed=0), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler("tpe", seed=0), optuna.samplers.TPESampler)
    evolution = make_sampler("evolution", seed=0, population_size=12)
    assert isinstance(evolution, RegularizedEvolutionSampler) and evolution.population_size == 12
    assert all(SAMPLERS.metadata(name)["description"] for name in SAMPLERS.names())


def test_a_plugin_sampler_registers_once_and_is_made_by_name() -> None:
    made: list[SamplerOptions] = []

    def factory(options: SamplerOptions) -> optuna.samplers.BaseSampler:
        made.append(options)
        return optuna.samplers.RandomSampler(seed=options.seed)

    SAMPLERS.register("test_plugin_sampler", factory, description="a test's own sampler")
    try:
        with pytest.raises(DuplicateNameError, match="sampler 'test_plugin_sampler' is already registered"):
            SAMPLERS.register("test_plugin_sampler", factory)
        assert isinstance(make_sampler("test_plugin_sampler", seed=4, population_size=3), optuna.samplers.RandomSampler)
        assert made == [SamplerOptions(seed=4, population_size=3)]
    finally:
        SAMPLERS.unregister("test_plugin_sampler")


def test_listing_sampler_names_does_not_import_optuna() -> None:
    script = (
        "import sys\nfrom nas.search.samplers import SAMPLERS\nfrom nas.space.schema import load_config\n"
        "load_config('digits_quick')\nprint(list(SAMPLERS.names()), 'optuna' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split("]")[-1].strip() == "False", result.stdout


@pytest.mark.parametrize(
    ("name", "hint"),
    [("nsga", "'nsga2'"), ("tpee", "'tpe'"), ("evolutoin", "'evolution'"), ("Random", "'random'")],
)
def test_unknown_sampler_name_gets_a_did_you_mean(name: str, hint: str) -> None:
    with pytest.raises(ValueError, match="sampler must be one of") as error:
        make_sampler(name, seed=0)
    message = str(error.value)
    assert message.endswith(f"; did you mean {hint}?")
    assert f"got {name!r}" in message
    assert all(repr(allowed) in message for allowed in SAMPLERS.names())


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

    assert all(sampler.parents(trial.number) is None for trial in trials[:population_size])
    children = trials[population_size:]
    assert all(sampler.parents(trial.number) is not None for trial in children)
    crossed = 0
    for child in children:
        parents = sampler.parents(child.number)
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
        for parent in sampler.parents(child.number):
            assert child.number - population_size <= parent < child.number


def test_evolution_proposals_are_a_function_of_seed_and_history() -> None:
    original = run_study(RegularizedEvolutionSampler(population_size=8, seed=3), mixed_objective, THREE_DIRECTIONS, 40)
    replayed = optuna.create_study(directions=THREE_DIRECTIONS, sampler=RegularizedEvolutionSampler(population_size=8, seed=3))
    for trial in original.trials[:30]:
        replayed.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, values=trial.values))
    replayed.optimize(mixed_objective, n_trials=10)
    assert proposals(replayed)[30:] == proposals(original)[30:]


def test_evolution_samples_non_categorical_parameters_at_random(caplog: pytest.LogCaptureFixture) -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        depth = trial.suggest_categorical("depth", [1, 2, 3, 4])
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        return float(depth), learning_rate

    with caplog.at_level("WARNING", logger="nas.search.evolution"):
        study = run_study(RegularizedEvolutionSampler(population_size=4, seed=0), objective, ["maximize", "minimize"], 20)
    assert all(1e-4 <= trial.params["learning_rate"] <= 1e-1 for trial in study.trials)
    assert len({trial.params["learning_rate"] for trial in study.trials}) == 20
    assert sum("'learning_rate'" in record.getMessage() for record in caplog.records) == 1


def test_evolution_beats_random_search() -> None:
    trials = 150

    def best_sum(name: str, seed: int) -> float:
        study = run_study(make_sampler(name, seed=seed, population_size=16), integer_objective, ["maximize", "minimize"], trials)
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
        sampler = make_sampler("evolution", seed=seed, population_size=population_size)
        study = run_study(sampler, constrained(integer_objective, integer_constraints), ["maximize", "minimize"], 100)
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
        parents = sampler.parents(child.number)
        assert len(parents) == (2 if crossover_probability else 1)
        assert child.params != study.trials[parents[0]].params


@pytest.mark.parametrize("with_walk", [True, False])
def test_evolution_children_of_a_conditional_space_differ_from_their_parents(with_walk: bool) -> None:
    """With the space's walk, a child differs from its parents as an arch; without it the sampler treats the
    population's parameters as a flat space and still proposes only what the objective asks for."""
    walk = CONDITIONAL_SPACE.walk()
    sampler = RegularizedEvolutionSampler(population_size=6, seed=0, walk=walk if with_walk else None)
    study = run_study(sampler, conditional_objective, ["maximize", "minimize"], 60)
    trials = study.trials
    archs = [arch_from_params(CONDITIONAL_SPACE, trial.params) for trial in trials]
    depths = {len(arch.stages[0].blocks) for arch in archs[6:]}
    types = {type(config).__name__ for arch in archs[6:] for config in arch.stages[0].blocks}
    assert len(depths) > 1 and len(types) == 2, "children explore depths and block types"
    if with_walk:
        for child in trials[6:]:
            for parent in sampler.parents(child.number):
                assert archs[child.number] != archs[parent]
