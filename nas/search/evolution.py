"""Multi-objective, constraint-aware regularized (aging) evolution (Real et al. 2019) with Once-for-All's uniform
crossover and mutation, as an Optuna sampler over a conditional (define-by-run) space."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas.search.samplers import ParamWalk

logger = logging.getLogger(__name__)

_PLAN_STREAM = 0
_INDEPENDENT_STREAM = 1


class RegularizedEvolutionSampler(BaseSampler):
    """Multi-objective aging evolution over categorical parameters, conditional ones included.

    * Startup: until ``population_size`` trials are complete, parameters are drawn uniformly at random.
    * Population: the ``population_size`` most recent complete trials by trial number (the oldest ones age out).
    * Selection: a tournament of ``tournament_size`` distinct members; the winner has the least total constraint
      violation (``FrozenTrial.constraints``, as ``Trial.set_constraint`` records them; feasible trials have none),
      then is non-dominated within the tournament under ``study.directions``, then is drawn at random among ties.
    * Crossover: with probability ``crossover_probability`` the winner is crossed, uniformly per parameter, with
      the winner of a second tournament among the other members.
    * Mutation: the child is walked (``walk``, the space's decisions; without one, the parameters the population has,
      as a flat space), and each active parameter moves to a different choice with probability
      ``mutation_probability`` (default ``1 / number of active parameters``); a parameter that becomes active (a
      deeper stage, another block type) takes a uniformly random value. When that leaves the child equal to a
      parent, one more active parameter is mutated, so the child differs from the tournament winner (unless every
      parameter has a single choice) and from the second parent whenever the choices allow it.

    The child is planned when the trial asks for its first parameter and handed out by ``sample_independent`` one
    parameter at a time, in whatever order the objective suggests them; a parameter the plan lacks (or whose value is
    outside the distribution asked for) is drawn at random. ``parents(number)`` gives a child's parents.

    Every random draw for trial ``n`` comes from a generator seeded by ``(seed, n, stream)``, so a proposal is a pure
    function of the seed and the study's history: a resumed or replayed study gets the same proposals.
    Non-categorical parameters are drawn at random.
    """

    def __init__(
        self,
        *,
        population_size: int = 16,
        tournament_size: int | None = None,
        crossover_probability: float = 0.5,
        mutation_probability: float | None = None,
        seed: int | None = None,
        walk: ParamWalk | None = None,
    ) -> None:
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
            raise ValueError(f"RegularizedEvolutionSampler population_size must be an integer >= 2, got {population_size!r}")
        if tournament_size is None:
            tournament_size = max(2, population_size // 4)
        if isinstance(tournament_size, bool) or not isinstance(tournament_size, int) or not 1 <= tournament_size <= population_size:
            raise ValueError(
                f"RegularizedEvolutionSampler tournament_size must be an integer in [1, population_size={population_size}], got {tournament_size!r}"
            )
        if not 0.0 <= crossover_probability <= 1.0:
            raise ValueError(f"RegularizedEvolutionSampler crossover_probability must be in [0, 1], got {crossover_probability!r}")
        if mutation_probability is not None and not 0.0 <= mutation_probability <= 1.0:
            raise ValueError(f"RegularizedEvolutionSampler mutation_probability must be in [0, 1] or None, got {mutation_probability!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"RegularizedEvolutionSampler seed must be a non-negative integer or None, got {seed!r}")
        self._population_size = population_size
        self._tournament_size = tournament_size
        self._crossover_probability = float(crossover_probability)
        self._mutation_probability = mutation_probability
        self._seed: int = seed if seed is not None else _fresh_seed()
        self._walk = walk
        self._plans: dict[int, dict[str, Any] | None] = {}
        self._parents: dict[int, tuple[int, ...]] = {}
        self._warned_parameters: set[str] = set()

    @property
    def population_size(self) -> int:
        return self._population_size

    @property
    def tournament_size(self) -> int:
        return self._tournament_size

    def parents(self, trial_number: int) -> tuple[int, ...] | None:
        """The trial numbers of the parents of child ``trial_number`` (``None`` for a startup trial or a trial this
        sampler did not plan)."""
        return self._parents.get(trial_number)

    def reseed_rng(self) -> None:
        """Draw a fresh base seed from the operating system (Optuna calls this for each worker when ``n_jobs > 1``)."""
        self._seed = _fresh_seed()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """Nothing is sampled relatively: the child is planned whole and handed out by ``sample_independent``."""
        return {}

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        """The planned child's value of ``param_name``, or a uniformly random one (generator seeded by ``(seed,
        trial.number, param_name)``) during startup and for parameters the plan lacks."""
        if isinstance(param_distribution, CategoricalDistribution):
            plan = self._plan(study, trial.number)
            if plan is not None and param_name in plan:
                value = plan[param_name]
                if any(_same_value(value, choice) for choice in param_distribution.choices):
                    return value
        elif param_name not in self._warned_parameters:
            self._warned_parameters.add(param_name)
            logger.warning(
                "RegularizedEvolutionSampler evolves categorical parameters only; %r (%s) is sampled at random",
                param_name,
                type(param_distribution).__name__,
            )
        stream = self._seed_sequence(trial.number, _INDEPENDENT_STREAM, zlib.crc32(param_name.encode()))
        seed = int(stream.generate_state(1)[0])
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._plans.pop(trial.number, None)

    def _plan(self, study: Study, number: int) -> dict[str, Any] | None:
        """The child planned for trial ``number`` (``None`` during startup), made on the first call."""
        if number in self._plans:
            return self._plans[number]
        population = self._population(study)
        plan: dict[str, Any] | None = None
        if len(population) >= self._population_size:
            generator = self._generator(number, _PLAN_STREAM)
            directions = list(study.directions)
            parents = [_tournament_winner(_draw(generator, population, self._tournament_size), directions, generator)]
            crossed = dict(parents[0].params)
            if generator.random() < self._crossover_probability:
                others = [member for member in population if member.number != parents[0].number]
                parents.append(_tournament_winner(_draw(generator, others, self._tournament_size), directions, generator))
                first, second = parents[0].params, parents[1].params
                for name in sorted(first.keys() | second.keys()):
                    take_second = generator.random() < 0.5
                    if name in second and (take_second or name not in first):
                        crossed[name] = second[name]
            walk = self._walk if self._walk is not None else _FlatWalk(population)
            plan = _Child(walk, crossed, [parent.params for parent in parents], generator).mutated(self._mutation_probability)
            self._parents[number] = tuple(parent.number for parent in parents)
            logger.debug("trial %d: child of trials %s", number, list(self._parents[number]))
        self._plans[number] = plan
        return plan

    def _population(self, study: Study) -> list[FrozenTrial]:
        """The ``population_size`` most recent complete trials, oldest first."""
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        members = [trial for trial in sorted(complete, key=lambda trial: trial.number) if trial.values is not None]
        return members[-self._population_size :]

    def _seed_sequence(self, trial_number: int, *stream: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self._seed, trial_number, *stream])

    def _generator(self, trial_number: int, *stream: int) -> np.random.Generator:
        return np.random.default_rng(self._seed_sequence(trial_number, *stream))


class _FlatWalk:
    """The categorical parameters the population has, as a space without conditions (the last distribution seen
    of each name), walked in name order."""

    def __init__(self, population: Sequence[FrozenTrial]) -> None:
        self.choices: dict[str, tuple[Any, ...]] = {}
        for trial in population:
            for name, distribution in trial.distributions.items():
                if isinstance(distribution, CategoricalDistribution):
                    self.choices[name] = tuple(distribution.choices)

    def choose_params(self, choose: Callable[[str, tuple[Any, ...]], Any]) -> dict[str, Any]:
        return {name: choose(name, self.choices[name]) for name in sorted(self.choices)}


class _Child:
    """A child's parameters while it is mutated: the crossed values where the walk asks for them, random values
    where it asks for one the parents lack, each decided once and kept across walks."""

    def __init__(self, walk: ParamWalk, crossed: dict[str, Any], parents: list[dict[str, Any]], generator: np.random.Generator) -> None:
        self.walk = walk
        self.crossed = crossed
        self.parents = parents
        self.generator = generator
        self.values: dict[str, Any] = {}
        self.choices: dict[str, tuple[Any, ...]] = {}

    def value(self, name: str, choices: tuple[Any, ...]) -> Any:
        if name not in self.values:
            self.choices[name] = choices
            value = self.crossed.get(name, _MISSING)
            if value is _MISSING or not any(_same_value(value, choice) for choice in choices):
                value = choices[int(self.generator.integers(len(choices)))]
            self.values[name] = value
        return self.values[name]

    def mutated(self, mutation_probability: float | None) -> dict[str, Any]:
        child = self.walk.choose_params(self.value)
        mutable = [name for name in child if len(self.choices[name]) > 1]
        if not mutable:
            logger.debug("no parameter has more than one choice; the child repeats its parent")
            return child
        probability = mutation_probability if mutation_probability is not None else 1.0 / len(mutable)

        def mutate(name: str, choices: tuple[Any, ...]) -> Any:
            value = self.value(name, choices)
            if len(choices) > 1 and self.generator.random() < probability:
                value = self.values[name] = _other_choice(choices, value, (), self.generator)
            return value

        child = self.walk.choose_params(mutate)
        if not any(_same_params(child, parent) for parent in self.parents):
            return child
        mutable = [name for name in child if len(self.choices[name]) > 1]
        order = [mutable[int(index)] for index in self.generator.permutation(len(mutable))]
        for name in order:
            avoided = tuple(parent[name] for parent in self.parents if name in parent)
            if _other_choices(self.choices[name], child[name], avoided):
                self.values[name] = _other_choice(self.choices[name], child[name], avoided, self.generator)
                return self.walk.choose_params(self.value)
        if order and _same_params(child, self.parents[0]):
            self.values[order[0]] = _other_choice(self.choices[order[0]], child[order[0]], (), self.generator)
            return self.walk.choose_params(self.value)
        return child


_MISSING = object()


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(2, dtype=np.uint64)[0])


def _same_value(first: Any, second: Any) -> bool:
    """Equality that tells ``True`` from ``1`` and ``1.0`` and treats NaN as equal to itself, as choices are told
    apart."""
    if type(first) is not type(second):
        return False
    if isinstance(first, float) and np.isnan(first) and np.isnan(second):
        return True
    return bool(first == second)


def _same_params(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return first.keys() == second.keys() and all(_same_value(first[name], second[name]) for name in first)


def _other_choices(choices: Sequence[Any], current: Any, avoided: Sequence[Any]) -> list[Any]:
    return [choice for choice in choices if not _same_value(choice, current) and not any(_same_value(choice, value) for value in avoided)]


def _other_choice(choices: Sequence[Any], current: Any, avoided: Sequence[Any], generator: np.random.Generator) -> Any:
    """A choice other than ``current`` and the ``avoided`` values, uniformly at random."""
    candidates = _other_choices(choices, current, avoided)
    return candidates[int(generator.integers(len(candidates)))]


def _draw(generator: np.random.Generator, members: Sequence[FrozenTrial], size: int) -> list[FrozenTrial]:
    """``size`` distinct members (all of them when there are fewer), in draw order."""
    indices = generator.choice(len(members), size=min(size, len(members)), replace=False)
    return [members[int(index)] for index in indices]


def _violation(trial: FrozenTrial) -> float:
    """Total constraint violation: the sum of the positive constraint values (0 for a feasible trial)."""
    return float(sum(value for value in trial.constraints.values() if value > 0))


def _dominates(first: Sequence[float], second: Sequence[float], directions: Sequence[StudyDirection]) -> bool:
    """Whether ``first`` Pareto-dominates ``second``: no worse in every objective and better in one."""
    better = False
    for value_first, value_second, direction in zip(first, second, directions, strict=True):
        if direction == StudyDirection.MAXIMIZE:
            value_first, value_second = -value_first, -value_second
        if value_first > value_second:
            return False
        if value_first < value_second:
            better = True
    return better


def _tournament_winner(entrants: Sequence[FrozenTrial], directions: Sequence[StudyDirection], generator: np.random.Generator) -> FrozenTrial:
    """The entrant with the least constraint violation, then non-dominated among those, then drawn at random."""
    violations = [_violation(entrant) for entrant in entrants]
    least = min(violations)
    candidates = [entrant for entrant, violation in zip(entrants, violations, strict=True) if violation == least]
    front = [
        candidate
        for candidate in candidates
        if not any(_dominates(other.values, candidate.values, directions) for other in candidates if other is not candidate)
    ]
    return front[int(generator.integers(len(front)))]


__all__ = ["RegularizedEvolutionSampler"]
