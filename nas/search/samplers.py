"""Optuna samplers for the multi-objective architecture search, behind one factory: ``make_sampler(name, seed=...)``.

The search is a multi-objective study (accuracy up, latency on one or more targets down) over a fixed set of
``CategoricalDistribution`` parameters generated from the search space. Constraints come as an Optuna
``constraints_func(frozen_trial) -> Sequence[float]`` (a value ``<= 0`` is satisfied). Every sampler made here records
those values on each finished trial in the ``"constraints"`` system attribute exactly like Optuna's own constrained
samplers do, so ``study.best_trials`` and Optuna's Pareto helpers keep infeasible trials off the front whichever
sampler ran the search.

``RegularizedEvolutionSampler`` is the aging evolution of Real et al. (2019) (tournament selection from the most recent
complete trials) with Once-for-All's uniform crossover and per-parameter mutation, made multi-objective and
constraint-aware by ranking tournament entrants on feasibility first, then Pareto dominance.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.samplers._base import _process_constraints_after_trial
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from nas.space.schema import SAMPLER_NAMES

logger = logging.getLogger(__name__)

SAMPLERS = SAMPLER_NAMES

ConstraintsFunction = Callable[[FrozenTrial], Sequence[float]]

PARENTS_KEY = "nasforge:evolution:parents"
"""Trial system attribute in which ``RegularizedEvolutionSampler`` records the parents' trial numbers of a child
(absent on startup trials)."""

TPE_MAX_STARTUP_TRIALS = 10

_RELATIVE_STREAM = 0
_INDEPENDENT_STREAM = 1


def make_sampler(
    name: str,
    *,
    seed: int,
    constraints_func: ConstraintsFunction | None = None,
    population_size: int = 16,
) -> BaseSampler:
    """The sampler called ``name`` (one of ``SAMPLERS``), seeded with ``seed``.

    * ``"nsga2"``: ``NSGAIISampler(population_size=population_size)``.
    * ``"tpe"``: multivariate ``TPESampler`` with ``min(10, population_size)`` random startup trials.
    * ``"random"``: ``RandomSampler``, wrapped in ``ConstraintRecordingSampler`` when constraints are given.
    * ``"evolution"``: ``RegularizedEvolutionSampler(population_size=population_size)``.

    ``constraints_func`` is recorded on every finished trial by every sampler, and steers those that can use it
    (NSGA-II, TPE, evolution). Optuna 5 deprecates the ``constraints_func`` argument of its samplers in favour of
    ``Trial.set_constraint``; this factory keeps the ``constraints_func`` contract and silences that one
    ``FutureWarning`` deliberately (the argument still works until Optuna 7).

    Raises ``ValueError`` for an unknown name (with a "did you mean") or a ``population_size`` below 2.
    """
    if name not in SAMPLERS:
        hint = difflib.get_close_matches(str(name), SAMPLERS, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {name!r}{suffix}")
    if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
        raise ValueError(f"sampler population_size must be an integer >= 2, got {population_size!r}")
    logger.debug(
        "making sampler %s (seed=%s, population_size=%d, constrained=%s)",
        name,
        seed,
        population_size,
        constraints_func is not None,
    )
    if name == "nsga2":
        with _constraints_func_deprecation_silenced():
            return NSGAIISampler(population_size=population_size, seed=seed, constraints_func=constraints_func)
    if name == "tpe":
        with _constraints_func_deprecation_silenced():
            return TPESampler(
                seed=seed,
                constraints_func=constraints_func,
                multivariate=True,
                n_startup_trials=min(TPE_MAX_STARTUP_TRIALS, population_size),
            )
    if name == "random":
        random_sampler = RandomSampler(seed=seed)
        if constraints_func is None:
            return random_sampler
        return ConstraintRecordingSampler(random_sampler, constraints_func)
    return RegularizedEvolutionSampler(population_size=population_size, seed=seed, constraints_func=constraints_func)


@contextlib.contextmanager
def _constraints_func_deprecation_silenced() -> Iterator[None]:
    """Ignore only Optuna 5's ``FutureWarning`` about the ``constraints_func`` argument of its samplers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`constraints_func`.*deprecated", category=FutureWarning)
        yield


class ConstraintRecordingSampler(BaseSampler):
    """Any sampler, plus Optuna's constraint bookkeeping: after each complete (or pruned) trial the values of
    ``constraints_func`` are stored in the trial's ``"constraints"`` system attribute, as Optuna's constrained samplers
    store them, so feasibility is honoured by ``study.best_trials`` for samplers without a ``constraints_func`` of
    their own (``RandomSampler``). Everything else is delegated to ``sampler``."""

    def __init__(self, sampler: BaseSampler, constraints_func: ConstraintsFunction) -> None:
        if not callable(constraints_func):
            raise TypeError(f"constraints_func must be callable, got {constraints_func!r}")
        self._sampler = sampler
        self._constraints_func = constraints_func

    @property
    def sampler(self) -> BaseSampler:
        """The wrapped sampler."""
        return self._sampler

    def __str__(self) -> str:
        return f"{self.__class__.__name__}({self._sampler})"

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        _process_constraints_after_trial(self._constraints_func, study, trial, state)
        self._sampler.after_trial(study, trial, state, values)


class RegularizedEvolutionSampler(BaseSampler):
    """Multi-objective aging (regularized) evolution over categorical parameters (Real et al. 2019), with
    Once-for-All's uniform crossover and mutation.

    * Startup: until ``population_size`` trials are complete, parameters are drawn uniformly at random.
    * Population: the ``population_size`` most recent complete trials by trial number (the oldest ones age out).
    * Selection: a tournament of ``tournament_size`` distinct members; the winner has the least total constraint
      violation (feasible trials have none), then is non-dominated within the tournament under
      ``study.directions``, then is drawn at random among the remaining ties.
    * Crossover: with probability ``crossover_probability`` the winner is crossed, uniformly per parameter, with
      the winner of a second tournament among the other members.
    * Mutation: each parameter moves to a different choice with probability ``mutation_probability`` (default
      ``1 / number of parameters``); when that leaves the child equal to a parent, one more parameter is mutated,
      so the child always differs from the tournament winner (unless every parameter has a single choice) and from
      the second parent whenever the choices allow it.

    The parents' trial numbers are stored in the child's ``PARENTS_KEY`` system attribute. Constraint values are
    read from ``FrozenTrial.constraints`` (whether recorded by ``constraints_func`` here or by
    ``Trial.set_constraint``), and ``constraints_func`` is recorded after each trial like Optuna's samplers do.

    Every random draw for trial ``n`` comes from a generator seeded by ``(seed, n, stream)``, so a proposal is a pure
    function of the seed and the study's history: a resumed or replayed study gets the same proposals. Parameters
    outside the categorical intersection search space are drawn at random (``sample_independent``).
    """

    def __init__(
        self,
        *,
        population_size: int = 16,
        tournament_size: int | None = None,
        crossover_probability: float = 0.5,
        mutation_probability: float | None = None,
        seed: int | None = None,
        constraints_func: ConstraintsFunction | None = None,
    ) -> None:
        if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
            raise ValueError(
                f"RegularizedEvolutionSampler population_size must be an integer >= 2, got {population_size!r}"
            )
        if tournament_size is None:
            tournament_size = max(2, population_size // 4)
        if isinstance(tournament_size, bool) or not isinstance(tournament_size, int) or not (
            1 <= tournament_size <= population_size
        ):
            raise ValueError(
                "RegularizedEvolutionSampler tournament_size must be an integer in "
                f"[1, population_size={population_size}], got {tournament_size!r}"
            )
        if not 0.0 <= crossover_probability <= 1.0:
            raise ValueError(
                f"RegularizedEvolutionSampler crossover_probability must be in [0, 1], got {crossover_probability!r}"
            )
        if mutation_probability is not None and not 0.0 <= mutation_probability <= 1.0:
            raise ValueError(
                "RegularizedEvolutionSampler mutation_probability must be in [0, 1] or None, "
                f"got {mutation_probability!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(
                f"RegularizedEvolutionSampler seed must be a non-negative integer or None, got {seed!r}"
            )
        if constraints_func is not None and not callable(constraints_func):
            raise TypeError(
                f"RegularizedEvolutionSampler constraints_func must be callable, got {constraints_func!r}"
            )
        self._population_size = population_size
        self._tournament_size = tournament_size
        self._crossover_probability = float(crossover_probability)
        self._mutation_probability = mutation_probability
        self._seed: int = seed if seed is not None else _fresh_seed()
        self._constraints_func = constraints_func
        self._search_space = IntersectionSearchSpace()
        self._warned_parameters: set[str] = set()

    @property
    def population_size(self) -> int:
        return self._population_size

    @property
    def tournament_size(self) -> int:
        return self._tournament_size

    def reseed_rng(self) -> None:
        """Draw a fresh base seed from the operating system (Optuna calls this for each worker when ``n_jobs > 1``)."""
        self._seed = _fresh_seed()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The categorical parameters that every complete trial has, with the same distribution."""
        return {
            name: distribution
            for name, distribution in self._search_space.calculate(study).items()
            if isinstance(distribution, CategoricalDistribution)
        }

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """A child of the population for ``trial``, or ``{}`` during startup (random parameters follow)."""
        if not search_space:
            return {}
        population = self._population(study, search_space)
        if len(population) < self._population_size:
            return {}
        generator = self._generator(trial.number, _RELATIVE_STREAM)
        directions = list(study.directions)

        first_entrants = _draw(generator, population, self._tournament_size)
        parents = [_tournament_winner(first_entrants, directions, generator)]
        child = {name: parents[0].params[name] for name in search_space}
        if generator.random() < self._crossover_probability:
            others = [member for member in population if member.number != parents[0].number]
            second_entrants = _draw(generator, others, self._tournament_size)
            parents.append(_tournament_winner(second_entrants, directions, generator))
            for name in search_space:
                if generator.random() < 0.5:
                    child[name] = parents[1].params[name]
        self._mutate(child, search_space, parents, generator)

        study._storage.set_trial_system_attr(trial._trial_id, PARENTS_KEY, [parent.number for parent in parents])
        logger.debug("trial %d: child of trials %s", trial.number, [parent.number for parent in parents])
        return child

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        """A uniformly random value, from a generator seeded by ``(seed, trial.number, param_name)``."""
        if not isinstance(param_distribution, CategoricalDistribution) and param_name not in self._warned_parameters:
            self._warned_parameters.add(param_name)
            logger.warning(
                "RegularizedEvolutionSampler evolves categorical parameters only; %r (%s) is sampled at random",
                param_name,
                type(param_distribution).__name__,
            )
        stream = self._seed_sequence(trial.number, _INDEPENDENT_STREAM, zlib.crc32(param_name.encode()))
        seed = int(stream.generate_state(1)[0])
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        if self._constraints_func is not None:
            _process_constraints_after_trial(self._constraints_func, study, trial, state)

    def _population(self, study: Study, search_space: dict[str, BaseDistribution]) -> list[FrozenTrial]:
        """The ``population_size`` most recent complete trials, oldest first. ``search_space`` is the intersection
        search space of the complete trials, so each of them has its parameters with the same distributions."""
        complete = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,), use_cache=True)
        members: list[FrozenTrial] = []
        for candidate in sorted(complete, key=lambda candidate: candidate.number, reverse=True):
            if len(members) == self._population_size:
                break
            if candidate.values is not None and all(name in candidate.params for name in search_space):
                members.append(candidate)
        return members[::-1]

    def _mutate(
        self,
        child: dict[str, Any],
        search_space: dict[str, BaseDistribution],
        parents: list[FrozenTrial],
        generator: np.random.Generator,
    ) -> None:
        """Mutate ``child`` in place: per parameter with the mutation probability, then once more if it still equals
        a parent, to a value that makes it equal to no parent where one exists, else to any value that makes it
        differ from the tournament winner ``parents[0]``."""
        mutable = [name for name, distribution in search_space.items() if len(_choices(distribution)) > 1]
        if not mutable:
            logger.debug("no parameter has more than one choice; the child repeats its parent")
            return
        probability = (
            self._mutation_probability if self._mutation_probability is not None else 1.0 / len(mutable)
        )
        for name in mutable:
            if generator.random() < probability:
                child[name] = _other_choice(search_space[name], child[name], (), generator)
        parent_params = [{name: parent.params[name] for name in search_space} for parent in parents]
        if not any(_same_params(child, params) for params in parent_params):
            return
        order = [mutable[int(index)] for index in generator.permutation(len(mutable))]
        for name in order:
            avoided = tuple(params[name] for params in parent_params)
            if _other_choices(search_space[name], child[name], avoided):
                child[name] = _other_choice(search_space[name], child[name], avoided, generator)
                return
        if _same_params(child, parent_params[0]):
            child[order[0]] = _other_choice(search_space[order[0]], child[order[0]], (), generator)

    def _seed_sequence(self, trial_number: int, *stream: int) -> np.random.SeedSequence:
        return np.random.SeedSequence([self._seed, trial_number, *stream])

    def _generator(self, trial_number: int, *stream: int) -> np.random.Generator:
        return np.random.default_rng(self._seed_sequence(trial_number, *stream))


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().generate_state(2, dtype=np.uint64)[0])


def _choices(distribution: BaseDistribution) -> tuple[Any, ...]:
    assert isinstance(distribution, CategoricalDistribution)
    return tuple(distribution.choices)


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


def _other_choices(distribution: BaseDistribution, current: Any, avoided: Sequence[Any]) -> list[Any]:
    return [
        choice
        for choice in _choices(distribution)
        if not _same_value(choice, current) and not any(_same_value(choice, value) for value in avoided)
    ]


def _other_choice(
    distribution: BaseDistribution, current: Any, avoided: Sequence[Any], generator: np.random.Generator
) -> Any:
    """A choice of ``distribution`` other than ``current`` and the ``avoided`` values, uniformly at random."""
    candidates = _other_choices(distribution, current, avoided)
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


def _tournament_winner(
    entrants: Sequence[FrozenTrial], directions: Sequence[StudyDirection], generator: np.random.Generator
) -> FrozenTrial:
    """The entrant with the least constraint violation, then non-dominated among those, then drawn at random."""
    violations = [_violation(entrant) for entrant in entrants]
    least = min(violations)
    candidates = [entrant for entrant, violation in zip(entrants, violations, strict=True) if violation == least]
    front = [
        candidate
        for candidate in candidates
        if not any(
            _dominates(other.values, candidate.values, directions) for other in candidates if other is not candidate
        )
    ]
    return front[int(generator.integers(len(front)))]


__all__ = [
    "PARENTS_KEY",
    "SAMPLERS",
    "ConstraintRecordingSampler",
    "RegularizedEvolutionSampler",
    "make_sampler",
]
