"""The sampler registry: every sampler a search can use, by name, behind one factory, ``make_sampler``.

``SAMPLERS`` maps a name to a factory ``factory(options: SamplerOptions) -> optuna.samplers.BaseSampler``. The
built-in factories import Optuna inside, so reading the names (the YAML schema, ``nas validate``, the CLI's help)
does not import it. A plugin adds its own sampler with
``SAMPLERS.register("my_sampler", factory, description="...")``.

Constraints reach every sampler through Optuna's ``Trial.set_constraint``: the search records each trial's
constraint values on the trial, and Optuna's samplers, ``RegularizedEvolutionSampler`` and ``study.best_trials``
all read ``FrozenTrial.constraints``. No sampler here takes a ``constraints_func`` (deprecated by Optuna 5).

The search space is conditional (a block field is a parameter only under its block type, a position only within
the chosen depth): samplers see it through Optuna's define-by-run ``suggest_categorical`` calls, and a sampler that
wants to walk it itself gets ``SamplerOptions.walk`` (the space's decision walk, see ``ParamWalk``).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nas.supernets.registry import Registry

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler

logger = logging.getLogger(__name__)

TPE_MAX_STARTUP_TRIALS = 10


class ParamWalk(Protocol):
    """A conditional parameter space, walked by a sampler: ``choose_params(choose)`` calls ``choose(name, choices)``
    for every active parameter in walk order (the value chosen for one decides which come next) and returns the
    parameters so chosen. ``nas.supernets.walk.SpaceWalk`` is one."""

    def choose_params(self, choose: Callable[[str, tuple[Any, ...]], Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class SamplerOptions:
    """What a sampler factory is given: the seed, the population size (``search.population_size``) and, when the
    study searches a space, the space's walk over its (conditional) parameters."""

    seed: int
    population_size: int = 16
    walk: ParamWalk | None = None


SamplerFactory = Callable[[SamplerOptions], "BaseSampler"]

SAMPLERS: Registry[SamplerFactory] = Registry("sampler")
"""Every sampler by its name in ``search.sampler`` and ``nas run --sampler``."""


def _nsga2(options: SamplerOptions) -> BaseSampler:
    from optuna.samplers import NSGAIISampler

    return NSGAIISampler(population_size=options.population_size, seed=options.seed)


def _tpe(options: SamplerOptions) -> BaseSampler:
    from optuna.exceptions import ExperimentalWarning
    from optuna.samplers import TPESampler

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*\bgroup\b.*", category=ExperimentalWarning)
        return TPESampler(seed=options.seed, multivariate=True, group=True, n_startup_trials=min(TPE_MAX_STARTUP_TRIALS, options.population_size))


def _random(options: SamplerOptions) -> BaseSampler:
    from optuna.samplers import RandomSampler

    return RandomSampler(seed=options.seed)


def _evolution(options: SamplerOptions) -> BaseSampler:
    from nas.search.evolution import RegularizedEvolutionSampler

    return RegularizedEvolutionSampler(population_size=options.population_size, seed=options.seed, walk=options.walk)


SAMPLERS.register("nsga2", _nsga2, description="Optuna's NSGA-II with population_size")
SAMPLERS.register(
    "tpe",
    _tpe,
    description=f"Optuna's multivariate, grouped TPE (conditional parameters), min({TPE_MAX_STARTUP_TRIALS}, population_size) startup trials",
)
SAMPLERS.register("random", _random, description="uniformly random archs")
SAMPLERS.register(
    "evolution", _evolution, description="regularized (aging) evolution, multi-objective and constraint-aware, mutating one decision of the space's walk"
)


def make_sampler(name: str, *, seed: int, population_size: int = 16, walk: ParamWalk | None = None) -> BaseSampler:
    """The sampler registered as ``name`` in ``SAMPLERS``, seeded with ``seed``.

    Raises ``ValueError`` for an unknown name (with the registered names and a "did you mean") or a
    ``population_size`` below 2.
    """
    problem = SAMPLERS.problem(name)
    if problem is not None:
        raise ValueError(f"sampler {problem}")
    if isinstance(population_size, bool) or not isinstance(population_size, int) or population_size < 2:
        raise ValueError(f"sampler population_size must be an integer >= 2, got {population_size!r}")
    logger.debug("making sampler %s (seed=%s, population_size=%d, walk=%s)", name, seed, population_size, walk is not None)
    return SAMPLERS.get(name)(SamplerOptions(seed=seed, population_size=population_size, walk=walk))


from nas.search import nni_samplers  # noqa: E402 - registers after the built-in samplers; imports no NNI itself

if importlib.util.find_spec("nni") is not None:
    nni_samplers.register(SAMPLERS)
else:
    for _name in nni_samplers.ALGORITHMS:
        SAMPLERS.needs(_name, f"NNI, which is not installed ({nni_samplers.INSTALL_HINT})")

__all__ = ["SAMPLERS", "ParamWalk", "SamplerFactory", "SamplerOptions", "make_sampler"]
