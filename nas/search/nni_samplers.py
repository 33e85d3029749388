"""NNI's multi-trial search algorithms as Optuna samplers: ``nni_evolution``, ``nni_tpe`` and ``nni_random`` (the
optional extra ``pip install nasforge[nni]``).

Each sampler drives one of NNI 3.0's HPO tuners through the tuner's own ask/tell API (``update_search_space``,
``generate_parameters(parameter_id)``, ``receive_trial_result(parameter_id, parameters, value)``, ``trial_end``), with
the Optuna trial number as NNI's ``parameter_id``; the algorithm is NNI's code, nothing here re-implements it:

* ``nni_evolution``: ``nni.algorithms.hpo.regularized_evolution_tuner.RegularizedEvolutionTuner`` (aging evolution:
  ``population_size`` random archs, then a tournament of ``population_size // 4`` drawn with replacement and a
  mutation of one parameter of the winner).
* ``nni_tpe``: ``nni.algorithms.hpo.tpe_tuner.TpeTuner`` with ``min(10, population_size)`` random startup trials
  (``nni.nas.strategy.TPE`` is exactly ``HPOTunerStrategy(TpeTuner(...))``).
* ``nni_random``: ``nni.algorithms.hpo.random_tuner.RandomTuner`` (uniform, deduplicated).

Why the HPO tuners and not ``nni.nas.strategy``: on NNI 3.0 ``import nni.nas.strategy`` fails unless
``pytorch_lightning`` is installed (``nni.nas.space`` imports ``nni.nas.evaluator``, whose PyTorch shortcut imports
Lightning), and the NAS strategies only run inside NNI's execution engine (a blocking ``run()`` that submits
``ExecutableModelSpace`` models), not one proposal at a time. ``nni.nas.strategy.PolicyBasedRL`` (PPO) additionally
needs ``tianshou`` and ``gym``, and the HPO ``PPOTuner`` needs TensorFlow 1 (``tensorflow.compat.v1``): no RL sampler
is registered.

The space: NNI's tuners take a flat space of categorical parameters. With the space's walk (``SamplerOptions.walk``,
a ``nas.supernets.walk.SpaceWalk``) a tuner gets every free decision of the space, the conditional ones included (a
superset of any one arch's parameters), each as the indices of its choices; a trial takes the values of the
decisions its arch makes active and ignores the rest, so every arch of the space is reachable. Without a walk the
first trial is drawn at random and the tuner's space is the categorical parameters of the first complete trial.
A parameter the tuner has no value for (outside its space, not categorical, or a proposal NNI could not make because
its space is exhausted) is drawn at random from a generator seeded by ``(seed, trial number, parameter name)``.

The reward: NNI's algorithms are single-objective. The study's objectives are scalarised with MnasNet's soft reward
``accuracy * (latency / T) ** -0.07``, where ``accuracy`` is the first objective the study maximizes, ``latency`` the
first it minimizes, and ``T`` the median latency of the first ``population_size`` complete trials (by trial number),
frozen once there are that many; before then, and where a latency or ``T`` is not positive, the reward is the
accuracy. A study with no maximized objective rewards minus the first objective. An infeasible trial (any constraint
recorded with ``Trial.set_constraint`` above 0) gets reward 0 (the reward assumes accuracies of 0 or more). A failed or
pruned trial is reported to the tuner as a failure (``trial_end(parameter_id, False)``), without a reward.

Reproducibility: the same seed gives the same proposals. ``TpeTuner`` and ``RandomTuner`` draw from their own
``numpy.random.Generator`` seeded with ``SamplerOptions.seed``; ``RegularizedEvolutionTuner`` draws from Python's
global ``random`` module, so each call into it runs with the sampler's own ``random`` state swapped in and the
caller's restored after it (no global random state leaks in or out; not thread-safe, like the tuner itself).
The tuner's state lives in the sampler: trials the tuner did not propose (enqueued anchors, a resumed study's earlier
trials) are not reported to it, and a resumed study starts the NNI algorithm afresh.

This module imports neither NNI nor Optuna until a sampler is made, so registering the names stays cheap.
"""

from __future__ import annotations

import functools
import logging
import random
import statistics
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler

    from nas.search.samplers import ParamWalk, SamplerOptions
    from nas.supernets.registry import Registry

logger = logging.getLogger(__name__)

MNASNET_EXPONENT = -0.07
"""The exponent of MnasNet's soft latency reward ``accuracy * (latency / T) ** exponent``."""

TPE_MAX_STARTUP_TRIALS = 10
INSTALL_HINT = 'pip install -c constraints.txt -e ".[nni]"'


class TunerDriver(Protocol):
    """One NNI tuner behind the calls the sampler makes: ``start(space)`` with ``{name: number of choices}``,
    ``propose(number)`` -> ``{name: choice index}`` (``None`` when NNI has nothing to propose), ``report(number,
    reward)`` and ``end(number, success)``."""

    def start(self, space: Mapping[str, int]) -> None: ...

    def propose(self, number: int) -> dict[str, int] | None: ...

    def report(self, number: int, reward: float) -> None: ...

    def end(self, number: int, success: bool) -> None: ...


def _import_nni() -> Any:
    """``nni``, with the stdout log handler that ``import nni`` installs removed (``nni.silence_stdout``): NNI's log
    records go to the application's logging like any library's, and the CLI keeps the terminal."""
    try:
        import nni
    except ImportError as error:
        raise ImportError(f"the NNI samplers need NNI 3.0: {INSTALL_HINT} ({error})") from error
    nni.silence_stdout()
    logging.getLogger("nni").setLevel(max(logging.WARNING, logging.getLogger("nni").getEffectiveLevel()))
    return nni


class ChoiceTunerDriver:
    """An NNI tuner whose space is one ``choice`` of choice indices per parameter (``TpeTuner``, ``RandomTuner``)."""

    def __init__(self, tuner: Any) -> None:
        self.tuner = tuner

    def start(self, space: Mapping[str, int]) -> None:
        self.tuner.update_search_space({name: {"_type": "choice", "_value": list(range(size))} for name, size in space.items()})

    def propose(self, number: int) -> dict[str, int] | None:
        return _indices_or_none(lambda: self.tuner.generate_parameters(number))

    def report(self, number: int, reward: float) -> None:
        self.tuner.receive_trial_result(number, None, reward)

    def end(self, number: int, success: bool) -> None:
        self.tuner.trial_end(number, success)


def tpe_driver(seed: int, population_size: int) -> TunerDriver:
    """``nni.algorithms.hpo.tpe_tuner.TpeTuner`` maximizing the reward, seeded, ``min(10, population_size)`` startup
    trials."""
    _import_nni()
    from nni.algorithms.hpo.tpe_tuner import TpeTuner

    startup = min(TPE_MAX_STARTUP_TRIALS, population_size)
    return ChoiceTunerDriver(TpeTuner(optimize_mode="maximize", seed=seed, tpe_args={"n_startup_jobs": startup}))


def random_driver(seed: int, population_size: int) -> TunerDriver:
    """``nni.algorithms.hpo.random_tuner.RandomTuner``, seeded; it learns nothing from rewards."""
    _import_nni()
    from nni.algorithms.hpo.random_tuner import RandomTuner

    return ChoiceTunerDriver(RandomTuner(seed=seed))


class EvolutionDriver:
    """``nni.algorithms.hpo.regularized_evolution_tuner.RegularizedEvolutionTuner`` (maximizing the reward) with
    ``population_size`` and a tournament of ``max(1, population_size // 4)``; each parameter a ``layer_choice`` of its
    choice indices. The tuner draws from the global ``random`` module: every call runs under ``own_random_state``."""

    def __init__(self, seed: int, population_size: int) -> None:
        _import_nni()
        from nni.algorithms.hpo.regularized_evolution_tuner import RegularizedEvolutionTuner

        self.random_state = random.Random(seed).getstate()
        self.tuner = RegularizedEvolutionTuner(optimize_mode="maximize", population_size=population_size, sample_size=max(1, population_size // 4))

    @contextmanager
    def own_random_state(self) -> Iterator[None]:
        """Python's global ``random`` state set to this driver's for the duration, the caller's restored after."""
        outside = random.getstate()
        random.setstate(self.random_state)
        try:
            yield
        finally:
            self.random_state = random.getstate()
            random.setstate(outside)

    def start(self, space: Mapping[str, int]) -> None:
        with self.own_random_state():
            self.tuner.update_search_space({name: {"_type": "layer_choice", "_value": list(range(size))} for name, size in space.items()})

    def propose(self, number: int) -> dict[str, int] | None:
        with self.own_random_state():
            proposal = _indices_or_none(lambda: self.tuner.generate_parameters(number))
        if proposal is None:
            return None
        return {name: int(value["_idx"]) for name, value in proposal.items()}

    def report(self, number: int, reward: float) -> None:
        with self.own_random_state():
            self.tuner.receive_trial_result(number, None, reward)

    def end(self, number: int, success: bool) -> None:
        with self.own_random_state():
            self.tuner.trial_end(number, success)


def _indices_or_none(generate: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """NNI's proposal, or ``None`` when the tuner raises ``nni.NoMoreTrialError`` (its space exhausted, or nothing
    to evolve yet because every proposal is still running)."""
    nni = _import_nni()
    try:
        return generate()
    except nni.NoMoreTrialError:
        return None


DriverFactory = Callable[[int, int], TunerDriver]

ALGORITHMS: dict[str, tuple[DriverFactory, str]] = {
    "nni_evolution": (
        EvolutionDriver,
        "NNI 3.0's RegularizedEvolutionTuner (aging evolution, tournament population_size // 4, one mutation) on the MnasNet soft reward",
    ),
    "nni_tpe": (tpe_driver, f"NNI 3.0's TpeTuner, min({TPE_MAX_STARTUP_TRIALS}, population_size) startup trials, on the MnasNet soft reward"),
    "nni_random": (random_driver, "NNI 3.0's RandomTuner (uniform, deduplicated)"),
}
"""Every NNI sampler: name -> (driver factory ``factory(seed, population_size)``, description)."""


def register(registry: Registry[Any]) -> None:
    """Register every NNI sampler of ``ALGORITHMS`` in ``registry`` (``nas.search.samplers.SAMPLERS``); NNI and
    Optuna are imported only when a sampler is made."""
    for name, (driver_factory, description) in ALGORITHMS.items():
        registry.register(name, functools.partial(make_nni_sampler, name, driver_factory), description=description)


def make_nni_sampler(name: str, driver_factory: DriverFactory, options: SamplerOptions) -> BaseSampler:
    """The Optuna sampler ``name`` driven by the tuner that ``driver_factory(seed, population_size)`` makes."""
    sampler_class = nni_sampler_class()
    return sampler_class(
        name, driver_factory(options.seed, options.population_size), seed=options.seed, population_size=options.population_size, walk=options.walk
    )


def superset_of(walk: ParamWalk | None) -> dict[str, tuple[Any, ...]] | None:
    """Every free decision of the space by name with its choices (conditional ones included), when ``walk`` is a
    ``SpaceWalk``; ``None`` otherwise (the space is then learnt from the first complete trial)."""
    from nas.supernets.walk import SpaceWalk

    if isinstance(walk, SpaceWalk):
        return {decision.name: tuple(decision.choices) for decision in walk.free_decisions}
    return None


def mnasnet_reward(values: list[float], directions: list[bool], latency_scale: float | None, feasible: bool) -> float:
    """MnasNet's soft reward of one trial (see the module docstring); ``directions[k]`` is whether objective ``k`` is
    maximized."""
    if not feasible:
        return 0.0
    if True not in directions:
        return -float(values[0])
    accuracy = float(values[directions.index(True)])
    if False not in directions or latency_scale is None or latency_scale <= 0:
        return accuracy
    latency = float(values[directions.index(False)])
    if latency <= 0:
        return accuracy
    return accuracy * (latency / latency_scale) ** MNASNET_EXPONENT


@functools.cache
def nni_sampler_class() -> type[BaseSampler]:
    """The Optuna sampler class (built on first use, so that importing this module does not import Optuna)."""
    from optuna.distributions import BaseDistribution, CategoricalDistribution
    from optuna.samplers import BaseSampler, RandomSampler
    from optuna.study import Study, StudyDirection
    from optuna.trial import FrozenTrial, TrialState

    class NNITunerSampler(BaseSampler):
        """An NNI tuner as an Optuna sampler (see ``nas.search.nni_samplers``): the tuner proposes a whole trial when
        the trial asks for its first parameter, ``sample_independent`` hands it out a parameter at a time, and a
        finished trial's MnasNet soft reward goes back to the tuner."""

        def __init__(self, name: str, driver: TunerDriver, *, seed: int, population_size: int, walk: ParamWalk | None) -> None:
            self.name = name
            self.driver = driver
            self.seed = seed
            self.population_size = population_size
            self.space = superset_of(walk)
            self.started = False
            self.plans: dict[int, dict[str, Any] | None] = {}
            self.latency_scale: float | None = None
            if self.space is not None:
                self.start(self.space)

        def start(self, space: dict[str, tuple[Any, ...]]) -> None:
            logger.debug("%s: %d parameters in the tuner's space", self.name, len(space))
            self.space = space
            self.driver.start({name: len(choices) for name, choices in space.items()})
            self.started = True

        def reseed_rng(self) -> None:
            logger.warning("%s keeps one NNI tuner's state: with n_jobs > 1 its workers share it", self.name)

        def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
            return {}

        def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
            return {}

        def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
            if isinstance(param_distribution, CategoricalDistribution):
                plan = self.plan(study, trial.number)
                if plan is not None and param_name in plan:
                    value = plan[param_name]
                    if any(type(value) is type(choice) and value == choice for choice in param_distribution.choices):
                        return value
            seed = int(zlib.crc32(f"{self.seed}/{trial.number}/{param_name}".encode()))
            return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)

        def plan(self, study: Study, number: int) -> dict[str, Any] | None:
            """The tuner's proposal for trial ``number`` as parameter values, asked for once."""
            if number in self.plans:
                return self.plans[number]
            if not self.started:
                complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda trial: trial.number)
                if not complete:
                    return None
                first = complete[0].distributions
                self.start(
                    {
                        name: tuple(first[name].choices)
                        for name in sorted(first)
                        if isinstance(first[name], CategoricalDistribution) and len(first[name].choices) > 1
                    }
                )
            indices = self.driver.propose(number)
            if indices is None or self.space is None:
                logger.info("%s: NNI proposed nothing for trial %d; it is drawn at random", self.name, number)
                plan = None
            else:
                plan = {name: self.space[name][index] for name, index in indices.items()}
            self.plans[number] = plan
            return plan

        def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: list[float] | None) -> None:
            if self.plans.pop(trial.number, None) is None:
                return
            if state != TrialState.COMPLETE or values is None:
                self.driver.end(trial.number, False)
                return
            directions = [direction == StudyDirection.MAXIMIZE for direction in study.directions]
            self.update_latency_scale(study, directions)
            feasible = all(value <= 0 for value in trial.constraints.values())
            reward = mnasnet_reward(list(values), directions, self.latency_scale, feasible)
            logger.debug("%s: trial %d reward %.6g", self.name, trial.number, reward)
            self.driver.report(trial.number, reward)
            self.driver.end(trial.number, True)

        def update_latency_scale(self, study: Study, directions: list[bool]) -> None:
            """Freeze ``T`` once ``population_size`` trials are complete: the median of their first minimized
            objective."""
            if self.latency_scale is not None or False not in directions:
                return
            complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda trial: trial.number)
            if len(complete) >= self.population_size:
                latency_index = directions.index(False)
                self.latency_scale = float(statistics.median(trial.values[latency_index] for trial in complete[: self.population_size]))
                logger.debug("%s: latency scale T = %.6g", self.name, self.latency_scale)

    return NNITunerSampler


__all__ = ["ALGORITHMS", "MNASNET_EXPONENT", "mnasnet_reward", "nni_sampler_class", "register"]
