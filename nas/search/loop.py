"""Hardware-aware search: an Optuna study over a trained supernet's subnets, accuracy against measured latency.

The study lives in ``RUN_DIR/search/study.journal`` (Optuna's journal file storage), so a killed search resumes
with ``--resume`` and the file opens in Optuna's own tools::

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("RUN_DIR/search/study.journal"))
    study = optuna.load_study(study_name="nasforge", storage=storage)

Objectives: validation accuracy with inherited weights after BN recalibration (maximise), then the median latency
on each target (minimise, milliseconds). Every trial records its arch JSON, parameters and MACs, and the full
measurement (p10, p90, CV, device fingerprint) as user attributes. Constraints (max latency per target, max
parameters, max MACs) are recorded on each trial with Optuna's ``Trial.set_constraint`` (Optuna 5's replacement for
a sampler's ``constraints_func``), which every sampler and ``study.best_trials`` read.

The loop is batch-synchronous: ask a batch of trials, evaluate their accuracy on the pool (in process, or Ray
actors), then measure the batch's latencies on every target in one interleaved call, in this process, while the
evaluators are idle, so the measurement runs on a quiet machine and on the one device the figures describe. An arch is evaluated and measured
once: a sampler that proposes it again gets the stored values (the trial records ``duplicate_of``), and latency
measurements are kept in ``RUN_DIR/search/latency.jsonl`` keyed on (arch, target, device fingerprint).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.space.schema import SAMPLER_NAMES, RunConfig, SearchModel
from nas.data.datasets import Split
from nas.run_dir import RunDir
from nas.search.evaluators import Evaluation, Evaluator, EvaluatorFactory, EvaluatorPayload, make_pool
from nas.supernets.space import Arch, SearchSpace, StageArch
from nas.data.tasks import load_task_data
from nas.training.loop import RunError, load_run

logger = logging.getLogger(__name__)

STUDY_NAME = "nasforge"
INT8_CALIBRATION_SAMPLES = 128
MAX_ASKS_PER_TRIAL = 20


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """The search as run: the YAML ``search`` section with command-line overrides applied."""

    trials: int
    sampler: str
    population_size: int
    targets: tuple[str, ...]
    threads: int
    batch_size: int
    measure_seconds: float
    latency_limits: tuple[tuple[str, float], ...] = ()
    max_params: int | None = None
    max_macs: int | None = None
    seed: int = 0
    workers: int = 1
    address: str | None = None

    @classmethod
    def from_config(cls, search: SearchModel, **overrides: Any) -> SearchSettings:
        constraints = search.constraints
        values: dict[str, Any] = {
            "trials": search.trials,
            "sampler": search.sampler,
            "population_size": search.population_size,
            "targets": tuple(dict.fromkeys(search.targets)),
            "threads": search.threads,
            "batch_size": search.batch_size,
            "measure_seconds": float(search.measure_seconds),
            "latency_limits": tuple((name, float(limit)) for name, limit in constraints.latency_ms.items()),
            "max_params": constraints.params,
            "max_macs": constraints.macs,
            "seed": search.seed,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**values)
        from nas.latency.measure import TARGET_NAMES

        unknown = [name for name in settings.targets if name not in TARGET_NAMES]
        if unknown:
            raise RunError(f"unknown latency target(s) {unknown}; targets are {list(TARGET_NAMES)}")
        if settings.sampler not in SAMPLER_NAMES:
            hint = difflib.get_close_matches(settings.sampler, SAMPLER_NAMES, n=1)
            suffix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise RunError(f"unknown sampler {settings.sampler!r}; samplers are {list(SAMPLER_NAMES)}{suffix}")
        if settings.trials < 1:
            raise RunError(f"--trials must be at least 1, got {settings.trials}")
        for name, _ in settings.latency_limits:
            if name not in settings.targets:
                raise RunError(f"search.constraints.latency_ms names {name!r}, which is not among search.targets {list(settings.targets)}")
        if settings.workers < 1:
            raise RunError(f"--workers must be at least 1, got {settings.workers}")
        return settings

    @property
    def constraint_names(self) -> list[str]:
        names = [f"latency_{name}_ms <= {limit:g}" for name, limit in self.latency_limits]
        if self.max_params is not None:
            names.append(f"params <= {self.max_params}")
        if self.max_macs is not None:
            names.append(f"macs <= {self.max_macs}")
        return names

    @property
    def metric_names(self) -> list[str]:
        return ["accuracy", *(latency_key(name) for name in self.targets)]


def latency_key(target: str) -> str:
    return f"latency_{target}_ms"


def _param_name(stage: int, position: int | None = None, detail: str = "") -> str:
    if position is None:
        return f"s{stage}.{detail}"
    return f"s{stage}.b{position}.{detail}"


def search_distributions(space: SearchSpace) -> dict[str, Any]:
    """Optuna distributions generated from ``space``: one categorical per choice with more than one value.

    Names: ``size`` (resolution or sequence length), ``s{i}.depth``, ``s{i}.width``, ``s{i}.b{j}.type`` (when a
    stage allows several block types), ``s{i}.b{j}.{type}.{field}``. Every block position up to the stage's maximum
    depth has its parameters, so the parameter set is the same for every trial (positions past the chosen depth are
    unused); ``arch_from_params`` reads only what the arch uses.
    """
    from optuna.distributions import CategoricalDistribution

    distributions: dict[str, Any] = {}

    def add(name: str, values: Sequence[Any]) -> None:
        if len(values) > 1:
            distributions[name] = CategoricalDistribution(list(values))

    add("size", space.input_sizes)
    for index, stage in enumerate(space.stages):
        add(_param_name(index, detail="depth"), stage.depths)
        add(_param_name(index, detail="width"), stage.widths)
        for position in range(max(stage.depths)):
            add(_param_name(index, position, "type"), [choices.type for choices in stage.blocks])
            for choices in stage.blocks:
                for field_name, values in choices.fields:
                    add(_param_name(index, position, f"{choices.type}.{field_name}"), values)
    return distributions


def arch_from_params(space: SearchSpace, params: dict[str, Any]) -> Arch:
    """The arch that ``params`` (from ``search_distributions``) describe."""

    def pick(name: str, values: Sequence[Any]) -> Any:
        return params[name] if len(values) > 1 else values[0]

    stages = []
    for index, stage in enumerate(space.stages):
        depth = pick(_param_name(index, detail="depth"), stage.depths)
        width = pick(_param_name(index, detail="width"), stage.widths)
        blocks = []
        for position in range(depth):
            type_name = pick(_param_name(index, position, "type"), [choices.type for choices in stage.blocks])
            choices = stage.choices_for(type_name)
            values = {name: pick(_param_name(index, position, f"{type_name}.{name}"), options) for name, options in choices.fields}
            blocks.append(choices.entry.config_class(**values))
        stages.append(StageArch(width, tuple(blocks)))
    size = pick("size", space.input_sizes)
    arch = Arch(tuple(stages), resolution=size) if space.modality == "image" else Arch(tuple(stages), sequence_length=size)
    space.check(arch)
    return arch


def params_from_arch(space: SearchSpace, arch: Arch) -> dict[str, Any]:
    """Parameters that ``arch_from_params`` maps back to ``arch`` (unused positions take their first choice)."""
    import dataclasses

    from nas.supernets.blocks import type_of

    space.check(arch)
    distributions = search_distributions(space)
    params: dict[str, Any] = {name: distribution.choices[0] for name, distribution in distributions.items()}
    params["size"] = arch.resolution if space.modality == "image" else arch.sequence_length
    for index, stage_arch in enumerate(arch.stages):
        params[_param_name(index, detail="depth")] = len(stage_arch.blocks)
        params[_param_name(index, detail="width")] = stage_arch.width
        for position, config in enumerate(stage_arch.blocks):
            type_name = type_of(config).name
            params[_param_name(index, position, "type")] = type_name
            for name, value in dataclasses.asdict(config).items():
                params[_param_name(index, position, f"{type_name}.{name}")] = value
    return {name: params[name] for name in distributions}


class LatencyCache:
    """Append-only JSON-lines file of measurements keyed on (arch JSON, target name, fingerprint key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str, str], dict[str, Any]] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    record = json.loads(line)
                    self.entries[(record["arch"], record["target"], record["fingerprint_key"])] = record["measurement"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s line %d is not a measurement record (a write cut short?); ignoring it", path, number)

    def get(self, arch_json: str, target: str, fingerprint: str) -> dict[str, Any] | None:
        return self.entries.get((arch_json, target, fingerprint))

    def put(self, arch_json: str, target: str, fingerprint: str, measurement: dict[str, Any]) -> None:
        self.entries[(arch_json, target, fingerprint)] = measurement
        line = json.dumps({"arch": arch_json, "target": target, "fingerprint_key": fingerprint, "measurement": measurement})
        with open(self.path, "a") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())


JOURNAL_LOCK_GRACE_SECONDS = 10


def journal_storage(path: Path) -> Any:
    """Optuna's journal storage on ``path``. The path is made absolute: Optuna's symlink lock points at the path as
    given, and a relative one dangles from inside the folder, so a lock left by a killed process would never be seen
    as stale (the next process spins on it). A lock not released for ``JOURNAL_LOCK_GRACE_SECONDS`` (appends take
    milliseconds) is taken to be a killed process's and broken."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    absolute = str(Path(path).resolve())
    lock = JournalFileSymlinkLock(absolute, grace_period=JOURNAL_LOCK_GRACE_SECONDS)
    return optuna.storages.JournalStorage(JournalFileBackend(absolute, lock_obj=lock))


def open_study(run_dir: Path, settings: SearchSettings, *, resume: bool) -> Any:
    """Create (or, with ``resume``, load) the run's study; refuses to mix a different search into an existing one."""
    import optuna

    from nas.search.samplers import make_sampler

    folder = RunDir(run_dir).search
    folder.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).study
    sampler = make_sampler(settings.sampler, seed=settings.seed, population_size=settings.population_size)
    storage = journal_storage(path)
    directions = ["maximize"] + ["minimize"] * len(settings.targets)
    existing = [summary.study_name for summary in optuna.study.get_all_study_summaries(storage)]
    if STUDY_NAME in existing:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
        stored = study.user_attrs.get("settings", {})
        if not resume:
            raise RunError(f"{path} already holds a search; add --resume to continue it or choose another --out")
        for key in ("targets", "threads", "batch_size", "latency_limits", "max_params", "max_macs"):
            if key in stored and json.loads(json.dumps(stored[key])) != json.loads(json.dumps(getattr(settings, key))):
                raise RunError(f"{path} was searched with {key} = {stored[key]}, this run asks for {getattr(settings, key)}; choose another --out")
        return study
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(settings.metric_names)
    study.set_user_attr("settings", {key: getattr(settings, key) for key in SearchSettings.__dataclass_fields__ if key != "address"})
    study.set_user_attr("constraints", settings.constraint_names)
    return study


def _calibration_split(train: Split, batch_size: int, batches: int, seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train.targets), generator=generator)[: batch_size * batches]
    return Split(train.inputs[order].contiguous(), train.targets[order].contiguous())


def build_payload(config: RunConfig, supernet: torch.nn.Module, task_data: Any, settings: SearchSettings) -> EvaluatorPayload:
    training = config.training
    from nas.latency.measure import builtin_targets

    int8 = any(builtin_targets()[name].model_kind == "int8" for name in settings.targets)
    return EvaluatorPayload(
        config_text=config.text,
        state={name: tensor.detach().clone() for name, tensor in supernet.state_dict().items()},
        calibration=_calibration_split(task_data.train, training.batch_size, training.calibration_batches, training.seed),
        validation=task_data.val,
        int8_calibration=task_data.train.inputs[:INT8_CALIBRATION_SAMPLES].clone(),
        batch_size=training.batch_size,
        calibration_batches=training.calibration_batches,
        int8=int8,
        seed=training.seed,
    )


@dataclass
class SearchResult:
    run_dir: Path
    study: Any
    settings: SearchSettings
    evaluated: int
    duplicates: int
    failed: int
    seconds: float
    startup_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    measurement_seconds: float = 0.0


def _measurement_values(measurement: dict[str, Any]) -> float:
    return float(measurement["median_ms"])


def _constraint_values(settings: SearchSettings, latencies: dict[str, dict[str, Any]], params: int, macs: int) -> dict[str, float]:
    """Named constraint values (feasible when <= 0), as Optuna's ``Trial.set_constraint`` stores them."""
    values = {latency_key(name): _measurement_values(latencies[name]) - limit for name, limit in settings.latency_limits}
    if settings.max_params is not None:
        values["params"] = float(params - settings.max_params)
    if settings.max_macs is not None:
        values["macs"] = float(macs - settings.max_macs)
    return values


def _recover_interrupted(study: Any) -> int:
    """Trials left RUNNING by a killed search: mark them failed and enqueue their params again (at the front)."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    count = 0
    for trial in stale:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            count += 1
    if count:
        logger.info("%d trial(s) were interrupted by the last run; they are queued again", count)
    return count


class _StopRequest:
    """Defers Ctrl-C to a safe point: the first SIGINT asks the search to stop once the batch in flight has been
    told to the study (so no journal write is cut in half); a second one stops at once. Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stopping after the batch in flight is recorded (Ctrl-C again to stop now)")

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def run_search(
    run_dir: Path,
    settings: SearchSettings,
    *,
    resume: bool = False,
    progress: Callable[[int, str, int], Any] | None = None,
    factory: EvaluatorFactory = Evaluator,
    measure: Callable[..., dict[str, Any]] | None = None,
) -> SearchResult:
    """Search the accuracy-latency front of the trained run in ``run_dir`` (see the module docstring).

    Args:
        run_dir: a run directory with a trained checkpoint.
        settings: budget (``trials`` distinct archs), sampler, targets, workers, constraints.
        resume: continue the study in ``run_dir`` (trials a killed run left running are redone; completed ones stay).
        progress: ``progress(total, description, initial)`` -> a tqdm-like bar.
        factory: builds the evaluator from the payload (tests inject failing evaluators).
        measure: ``measure({(arch_json, target name): model bytes}) -> {same key: measurement dict}``; default
            ``nas.latency.measure_latency`` with this run's protocol settings, all pairs interleaved in one call.
    """
    from optuna.trial import TrialState

    started = time.perf_counter()
    run_dir = Path(run_dir)
    config, supernet, _ = load_run(run_dir)
    metrics_path = RunDir(run_dir).metrics
    if not metrics_path.exists():
        raise RunError(f"{run_dir}: training has not finished (no metrics.json); resume it with `nas train --resume` first")
    space = config.space
    measure = measure or _default_measure(settings)
    fingerprints = _fingerprints(settings)
    study = open_study(run_dir, settings, resume=resume)
    _recover_interrupted(study)
    distributions = search_distributions(space)
    if not study.trials:
        for anchor in (space.largest(), space.smallest()):
            study.enqueue_trial(params_from_arch(space, anchor), user_attrs={"anchor": True})

    completed: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        completed.setdefault(trial.user_attrs.get("arch"), trial)
    completed.pop(None, None)
    latency_cache = LatencyCache(RunDir(run_dir).latency_cache)
    evaluated = len(completed)
    target_total = min(settings.trials, space.count())
    if evaluated >= target_total:
        return SearchResult(run_dir, study, settings, evaluated, 0, 0, time.perf_counter() - started)

    task_data = load_task_data(config.task, space, seed=config.training.seed)
    payload = build_payload(config, supernet, task_data, settings)
    del supernet
    pool = make_pool(payload, workers=settings.workers, address=settings.address, factory=factory)
    startup_seconds = time.perf_counter() - started
    batch_size = max(8, 4 * pool.workers)
    bar = progress(target_total, "search", evaluated) if progress else None
    duplicates = failed = batches = 0
    phase_seconds = [0.0, 0.0]
    max_asks = MAX_ASKS_PER_TRIAL * target_total
    asks = 0
    stop = _StopRequest()
    try:
        stop.__enter__()
        while evaluated < target_total and asks < max_asks:
            stop.check()
            batch_started = time.perf_counter()
            batch: dict[str, list[Any]] = {}
            while len(batch) < min(batch_size, target_total - evaluated) and asks < max_asks:
                trial = study.ask(distributions)
                asks += 1
                arch = arch_from_params(space, trial.params)
                arch_json = arch.to_json()
                trial.set_user_attr("arch", arch_json)
                if arch_json in completed:
                    _tell_duplicate(study, trial, completed[arch_json])
                    duplicates += 1
                    continue
                batch.setdefault(arch_json, []).append(trial)
            if not batch:
                continue
            outcomes = {outcome.arch_json: outcome for outcome in pool.map(list(batch))}
            evaluations = {key: outcome.evaluation for key, outcome in outcomes.items() if outcome.evaluation is not None}
            evaluated_at = time.perf_counter()
            latencies = _measure_batch(evaluations, settings, fingerprints, latency_cache, measure)
            phase_seconds[0] += evaluated_at - batch_started
            phase_seconds[1] += time.perf_counter() - evaluated_at
            logger.info(
                "batch %d: %d arch(s) evaluated in %.2f s, measured in %.2f s", batches + 1, len(batch),
                evaluated_at - batch_started, time.perf_counter() - evaluated_at,
            )
            for arch_json, trials in batch.items():
                outcome = outcomes[arch_json]
                if outcome.evaluation is None:
                    failed += len(trials)
                    for trial in trials:
                        trial.set_user_attr("error", outcome.error)
                        study.tell(trial, state=TrialState.FAIL)
                    logger.warning("trial %d failed: %s", trials[0].number, outcome.error)
                    continue
                first = _tell_evaluation(study, trials[0], outcome.evaluation, latencies[arch_json], settings)
                completed[arch_json] = first
                for trial in trials[1:]:
                    _tell_duplicate(study, trial, first)
                    duplicates += 1
                evaluated += 1
                if bar is not None:
                    bar.update(1)
            batches += 1
            if bar is not None:
                bar.set_postfix(_progress_summary(study, settings))
            if failed > max(5, target_total // 2) and evaluated == 0:
                raise RunError(f"every evaluation fails; the first error: {next(iter(outcomes.values())).error}")
        stop.check()
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
        pool.close()
    if asks >= max_asks and evaluated < target_total:
        logger.warning("the sampler kept proposing archs already evaluated; stopping at %d distinct archs", evaluated)
    return SearchResult(run_dir, study, settings, evaluated, duplicates, failed, time.perf_counter() - started, startup_seconds, *phase_seconds)


def _progress_summary(study: Any, settings: SearchSettings) -> dict[str, str]:
    trials = distinct_trials(study)
    if not trials:
        return {}
    summary = {"best acc": f"{max(trial.values[0] for trial in trials):.3f}"}
    for name in settings.targets:
        summary[f"front {name}"] = str(len(pareto_front(study, name)))
    return summary


def _tell_duplicate(study: Any, trial: Any, original: Any) -> None:
    for key, value in original.user_attrs.items():
        if key not in ("anchor", "retry_of"):
            trial.set_user_attr(key, value)
    trial.set_user_attr("duplicate_of", original.number)
    for name, value in original.constraints.items():
        trial.set_constraint(name, value)
    study.tell(trial, list(original.values))


def _tell_evaluation(study: Any, trial: Any, evaluation: Evaluation, latencies: dict[str, dict[str, Any]], settings: SearchSettings) -> Any:
    trial.set_user_attr("params", evaluation.params)
    trial.set_user_attr("macs", evaluation.macs)
    trial.set_user_attr("evaluation_seconds", round(evaluation.seconds, 4))
    trial.set_user_attr("worker", evaluation.worker)
    if evaluation.int8_top1_agreement is not None:
        trial.set_user_attr("int8_top1_agreement", evaluation.int8_top1_agreement)
    for name in settings.targets:
        trial.set_user_attr(latency_key(name), latencies[name])
    for name, value in _constraint_values(settings, latencies, evaluation.params, evaluation.macs).items():
        trial.set_constraint(name, value)
    values = [evaluation.accuracy, *(_measurement_values(latencies[name]) for name in settings.targets)]
    study.tell(trial, values)
    return study.get_trials(deepcopy=False)[trial.number]


def _fingerprints(settings: SearchSettings) -> dict[str, dict[str, Any]]:
    from nas.latency.measure import device_fingerprint, resolve_target

    return {name: device_fingerprint(resolve_target(name, threads=settings.threads, batch_size=settings.batch_size)) for name in settings.targets}


def _default_measure(settings: SearchSettings) -> Callable[[dict[tuple[str, str], bytes]], dict[tuple[str, str], Any]]:
    from nas.latency.measure import measure_latency, resolve_target

    targets = {name: resolve_target(name, threads=settings.threads, batch_size=settings.batch_size) for name in settings.targets}

    def measure(models: dict[tuple[str, str], bytes]) -> dict[tuple[str, str], Any]:
        """``{(arch_json, target name): model bytes}`` measured interleaved in one call."""
        results = measure_latency(
            models, {key: targets[key[1]] for key in models}, max_seconds=settings.measure_seconds * len(models), seed=settings.seed
        )
        return {key: value.to_dict() for key, value in results.items()}

    return measure


def _measure_batch(
    evaluations: dict[str, Evaluation], settings: SearchSettings, fingerprints: dict[str, dict[str, Any]],
    cache: LatencyCache, measure: Callable[[dict[tuple[str, str], bytes]], dict[tuple[str, str], Any]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arch, per target: the measurement from the cache, else measured now. Every (arch, target) pair the cache
    lacks is measured in one interleaved call, so a batch's archs and an arch's fp32 and INT8 models are compared
    under the same machine load."""
    from nas.latency.measure import builtin_targets, fingerprint_key

    results: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in evaluations}
    keys = {name: fingerprint_key(fingerprints[name]) for name in settings.targets}
    missing: dict[tuple[str, str], bytes] = {}
    for name in settings.targets:
        kind = builtin_targets()[name].model_kind
        for arch_json, evaluation in evaluations.items():
            cached = cache.get(arch_json, name, keys[name])
            if cached is not None:
                results[arch_json][name] = cached
            else:
                missing[(arch_json, name)] = evaluation.models[kind]
    if missing:
        for (arch_json, name), measurement in measure(missing).items():
            cache.put(arch_json, name, keys[name], measurement)
            results[arch_json][name] = measurement
    return results


def feasible(trial: Any) -> bool:
    """Whether every constraint the trial recorded (``Trial.set_constraint``) is met."""
    return all(value <= 0 for value in trial.constraints.values())


def distinct_trials(study: Any) -> list[Any]:
    """Complete trials, one per arch (duplicates dropped)."""
    from optuna.trial import TrialState

    return [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "duplicate_of" not in trial.user_attrs]


def pareto_front(study: Any, target: str) -> list[Any]:
    """Feasible distinct trials on the (accuracy max, latency-on-``target`` min) front, fastest first."""
    from optuna.study._multi_objective import _is_pareto_front

    settings = study.user_attrs["settings"]
    index = 1 + list(settings["targets"]).index(target)
    trials = [trial for trial in distinct_trials(study) if feasible(trial)]
    if not trials:
        return []
    losses = np.asarray([[-trial.values[0], trial.values[index]] for trial in trials])
    mask = _is_pareto_front(losses, assume_unique_lexsorted=False)
    return sorted((trial for trial, keep in zip(trials, mask) if keep), key=lambda trial: trial.values[index])


def hypervolume(front: Iterable[Any], index: int, reference_latency: float) -> float:
    """Area dominated by the front in (accuracy, latency) above accuracy 0 and below ``reference_latency``."""
    from optuna._hypervolume import compute_hypervolume

    points = np.asarray([[-trial.values[0], trial.values[index]] for trial in front])
    if len(points) == 0:
        return 0.0
    return float(compute_hypervolume(points, np.asarray([0.0, reference_latency])))


def load_study(run_dir: Path) -> Any:
    """The study of a searched run directory."""
    import optuna

    path = RunDir(run_dir).study
    if not path.exists():
        raise RunError(f"{run_dir} has no search yet ({path} is missing); run `nas run` first")
    return optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(path))


__all__ = [
    "LatencyCache",
    "SearchResult",
    "SearchSettings",
    "arch_from_params",
    "distinct_trials",
    "feasible",
    "hypervolume",
    "load_study",
    "open_study",
    "params_from_arch",
    "pareto_front",
    "run_search",
    "search_distributions",
]
