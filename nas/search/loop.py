"""Hardware-aware search: an Optuna study over a trained supernet's subnets, accuracy against measured latency.

The search is split by concern: ``settings`` (the search as run), ``encoding`` (the conditional Optuna encoding of a
space, from its decision walk), ``samplers`` (the sampler registry) and ``evolution``, ``study`` (journal storage,
create / resume / load, distinct and feasible trials), ``front`` (Pareto front and hypervolume), ``latency_cache``
and ``evaluators`` (in process or Ray). This module is the loop.

Objectives: validation accuracy with inherited weights after BN recalibration (maximise; the accuracy of the fp32
ONNX file the export writes for the arch, see ``evaluators``), then the median latency on each target (minimise,
milliseconds). Every trial records its arch JSON, parameters and MACs, and the full
measurement (p10, p90, CV, device fingerprint) as user attributes. Constraints (max latency per target, max
parameters, max MACs) are recorded on each trial with Optuna's ``Trial.set_constraint``, which every sampler and
``study.best_trials`` read.

The loop is batch-synchronous: ask a batch of trials (each suggests its arch through the conditional encoding),
evaluate their accuracy on the pool (in process, or Ray actors), then measure the batch's latencies on every target
in one interleaved call, in this process, while the evaluators are idle, so the measurement runs on a quiet machine
and on the one device the figures describe. An arch is evaluated and measured once: a sampler that proposes it
again gets the stored values (the trial records ``duplicate_of``), and latency measurements are kept in
``RUN_DIR/search/latency.jsonl`` keyed on (arch, target, device fingerprint).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nas import jsonio
from nas.data.tasks import load_task_data
from nas.run_dir import RunDir
from nas.run_lock import locks_run_dir
from nas.search.encoding import params_from_arch, suggest_arch
from nas.search.evaluators import Evaluation, Evaluator, EvaluatorFactory, EvaluatorPayload, Pool, make_pool
from nas.search.front import pareto_front
from nas.search.latency_cache import LatencyCache
from nas.search.settings import SearchSettings, latency_key
from nas.search.study import distinct_trials, open_study
from nas.space.schema import RunConfig
from nas.supernets.space import Arch
from nas.training.evaluation import run_calibration_batches
from nas.training.loop import RunError, load_run

logger = logging.getLogger(__name__)

Measure = Callable[[dict[tuple[str, str], bytes]], dict[tuple[str, str], Any]]
"""``measure({(arch_json, target name): model bytes}) -> {same key: measurement dict}``."""
MAX_ASKS_PER_TRIAL = 20


def build_payload(config: RunConfig, supernet: torch.nn.Module, task_data: Any, settings: SearchSettings) -> EvaluatorPayload:
    """What every evaluator needs, by value: the BN calibration batches and INT8 calibration inputs are the very ones
    training's final metrics and the export use (``run_calibration_batches``, ``int8_calibration_inputs``)."""
    from nas.export.subnet import int8_calibration_inputs
    from nas.latency.targets import get_target

    int8 = any(get_target(name).model_kind == "int8" for name in settings.targets)
    return EvaluatorPayload(
        config_text=config.text,
        base_dir=str(config.base_dir) if config.base_dir else None,
        state={name: tensor.detach().clone() for name, tensor in supernet.state_dict().items()},
        calibration=run_calibration_batches(config, task_data.train),
        validation=task_data.val,
        int8_calibration=int8_calibration_inputs(task_data.train).clone(),
        int8=int8,
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
    front_check_seconds: float = 0.0
    """Predicted-latency searches: the measurement of the fronts after the search (part of ``seconds``)."""


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


@locks_run_dir("run_dir")
def run_search(
    run_dir: Path,
    settings: SearchSettings,
    *,
    resume: bool = False,
    progress: Callable[[int, str, int], Any] | None = None,
    factory: EvaluatorFactory = Evaluator,
    measure: Measure | None = None,
) -> SearchResult:
    """Search the accuracy-latency front of the trained run in ``run_dir`` (see the module docstring). The call holds
    the run folder's lock (``nas.run_lock``): a folder another process holds raises ``RunBusyError`` at once.

    Args:
        run_dir: a run directory with a trained checkpoint.
        settings: budget (``trials`` distinct archs), sampler, targets, workers, constraints.
        resume: continue the study in ``run_dir`` (trials a killed run left running are redone; completed ones stay;
            a journal record cut short by the kill is set aside, see ``nas.search.study.prepare_journal``).
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
    _check_size_limits(space, settings)
    measure_models = measure or _default_measure(settings)
    fingerprints = _fingerprints(settings)
    predictors = latency_predictors(space, settings, fingerprints) if settings.latency == "predicted" else {}
    study = open_study(run_dir, settings, resume=resume, walk=space.walk())
    _recover_interrupted(study)
    if not study.trials:
        for anchor in (space.largest(), space.smallest()):
            study.enqueue_trial(params_from_arch(space, anchor), user_attrs={"anchor": True})

    completed: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        arch_json = trial.user_attrs.get("arch")
        if arch_json is not None:
            completed.setdefault(arch_json, trial)
    smallest_json = space.smallest().to_json()
    if smallest_json in completed:
        _stop_if_unreachable(settings, space.smallest().short_name(), completed[smallest_json].user_attrs, len(completed))
    latency_cache = LatencyCache(RunDir(run_dir).latency_cache)
    evaluated = len(completed)
    target_total = min(settings.trials, space.count())
    front_checked = not predictors or RunDir(run_dir).front_check.exists()
    if evaluated >= target_total and front_checked:
        return SearchResult(run_dir, study, settings, evaluated, 0, 0, time.perf_counter() - started)

    task_data = load_task_data(config.task, space, seed=config.training.seed)
    payload = build_payload(config, supernet, task_data, settings)
    del supernet
    pool = make_pool(payload, workers=settings.workers, address=settings.address, factory=factory)
    startup_seconds = time.perf_counter() - started
    batch_size = max(8, 4 * pool.workers)
    bar = progress(target_total, "search", evaluated) if progress else None
    duplicates = failed = batches = 0
    phase_seconds = [0.0, 0.0, 0.0]
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
                trial = study.ask()
                asks += 1
                arch = suggest_arch(trial, space)
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
            if predictors:
                latencies = _predict_batch(evaluations, space, predictors, fingerprints)
            else:
                latencies = _measure_batch(evaluations, settings, fingerprints, latency_cache, measure_models)
            phase_seconds[0] += evaluated_at - batch_started
            phase_seconds[1] += time.perf_counter() - evaluated_at
            logger.info(
                "batch %d: %d arch(s) evaluated in %.2f s, measured in %.2f s",
                batches + 1,
                len(batch),
                evaluated_at - batch_started,
                time.perf_counter() - evaluated_at,
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
            if smallest_json in batch and smallest_json in latencies:
                _stop_if_unreachable(settings, space.smallest().short_name(), latencies[smallest_json], evaluated)
            if bar is not None:
                bar.set_postfix(_progress_summary(study, settings))
            if failed > max(5, target_total // 2) and evaluated == 0:
                raise RunError(f"every evaluation fails; the first error: {next(iter(outcomes.values())).error}")
        stop.check()
        if predictors:
            if bar is not None:
                bar.close()
                bar = None
            check_started = time.perf_counter()
            check_front(run_dir, study, settings, pool, fingerprints, latency_cache, measure_models)
            phase_seconds[2] = time.perf_counter() - check_started
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
        pool.close()
    if asks >= max_asks and evaluated < target_total:
        logger.warning("the sampler kept proposing archs already evaluated; stopping at %d distinct archs", evaluated)
    return SearchResult(run_dir, study, settings, evaluated, duplicates, failed, time.perf_counter() - started, startup_seconds, *phase_seconds)


def _check_size_limits(space: Any, settings: SearchSettings) -> None:
    """Refuse a parameter or MAC limit below the space's smallest subnet (settings built in Python skip the space
    file's check, ``nas.space.schema``); costs nothing when no such limit is set."""
    from nas.supernets.costs import space_minimum

    for key, limit, unit in (("params", settings.max_params, "parameters"), ("macs", settings.max_macs, "MACs (batch 1)")):
        if limit is not None and limit < (minimum := space_minimum(space, key)):
            raise RunError(f"search.constraints.{key}: {limit:,} is below the smallest subnet's {minimum:,} {unit}: no subnet of the space can meet it")


def _stop_if_unreachable(settings: SearchSettings, arch_name: str, latencies: dict[str, Any], evaluated: int) -> None:
    """Stop the search (``RunError``) when the space's smallest subnet, measured, misses a latency limit: no subnet is
    then likely to meet it, and the budget would be spent on an empty front. ``latencies``: per target name the
    measurement dict (a trial's user attributes hold it under ``latency_key(name)``)."""
    missed = []
    for name, limit in settings.latency_limits:
        measurement = latencies.get(name) or latencies.get(latency_key(name)) or {}
        median = measurement.get("median_ms")
        if isinstance(median, int | float) and median > limit:
            missed.append(
                f"search.constraints.latency_ms.{name}: the smallest subnet ({arch_name}) measured {median:.4g} ms (median) on {name}, "
                f"above the limit {limit:g} ms"
            )
    if missed:
        raise RunError(
            "; ".join(missed)
            + f". No subnet is likely to meet it, so the search stops after {evaluated} arch(s) instead of spending its budget of {settings.trials}; "
            "raise the limit (a run folder keeps the limits it was searched with: search again with another --out)"
        )


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
    """Record the evaluation on ``trial`` and tell it. User attributes go into the journal as JSON: non-finite floats
    are stored as None (``jsonio.finite``). ``int8_accuracy`` is the INT8 model's validation accuracy (what the INT8
    fronts rank); ``int8_error`` says why the arch has no INT8 model (it is then on no INT8 front)."""
    attrs: dict[str, Any] = {
        "params": evaluation.params,
        "macs": evaluation.macs,
        "evaluation_seconds": round(evaluation.seconds, 4),
        "worker": evaluation.worker,
        "int8_top1_agreement": evaluation.int8_top1_agreement,
        "int8_accuracy": evaluation.int8_accuracy,
        "int8_error": evaluation.int8_error,
        **{latency_key(name): latencies[name] for name in settings.targets},
    }
    for key, value in attrs.items():
        if value is not None:
            trial.set_user_attr(key, jsonio.finite(value))
    for name, value in _constraint_values(settings, latencies, evaluation.params, evaluation.macs).items():
        trial.set_constraint(name, value)
    values = [evaluation.accuracy, *(_measurement_values(latencies[name]) for name in settings.targets)]
    study.tell(trial, values)
    return study.get_trials(deepcopy=False)[trial.number]


def _fingerprints(settings: SearchSettings) -> dict[str, dict[str, Any]]:
    from nas.latency.fingerprint import device_fingerprint
    from nas.latency.targets import resolve_target

    return {name: device_fingerprint(resolve_target(name, threads=settings.threads, batch_size=settings.batch_size)) for name in settings.targets}


def latency_predictors(space: Any, settings: SearchSettings, fingerprints: dict[str, dict[str, Any]] | None = None) -> dict[str, tuple[Any, str, str]]:
    """Per target: the latency predictor of the hardware profile measured on this device (``search.profiles`` names
    a folder per target; else the profile is looked up by device, ``nas.predictors.profile.find_profile``) and the
    profile's folder and statistic (``p10`` or ``median``: what its predictors predict). A profile of another device
    or space is refused (``RunError`` naming what differs)."""
    from nas.predictors.base import PredictorError
    from nas.predictors.profile import find_profile, load_profile

    fingerprints = fingerprints or _fingerprints(settings)
    given = dict(settings.profiles)
    chosen: dict[str, tuple[Any, str, str]] = {}
    for name in settings.targets:
        try:
            profile = load_profile(Path(given[name]), space, fingerprint=fingerprints[name]) if name in given else find_profile(space, fingerprints[name])
            if profile.target != name:
                raise RunError(f"search.profiles.{name}: {profile.folder} is a profile of target {profile.target!r}, not {name!r}")
            chosen[name] = (profile.predictor(), str(profile.folder), profile.statistic)
            if not profile.complete:
                logger.warning(
                    "the profile %s for %s is incomplete (its measurement did not finish): its predictions rest on fewer subnets", profile.folder, name
                )
        except PredictorError as error:
            raise RunError(f"search.latency is 'predicted', but target {name!r} has no usable profile: {error}") from None
        logger.info("latency on %s predicted by %s from %s", name, chosen[name][0].name, chosen[name][1])
    return chosen


def _predict_batch(
    evaluations: dict[str, Evaluation], space: Any, predictors: dict[str, tuple[Any, str, str]], fingerprints: dict[str, dict[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arch, per target: the predicted latency, shaped as a measurement (median = p10 = p90 = the prediction, no
    samples) and marked ``predicted`` with the predictor, the profile and the statistic it predicts."""
    archs = {arch_json: Arch.from_json(arch_json, space, source="the study's arch") for arch_json in evaluations}
    results: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in evaluations}
    for name, (predictor, folder, statistic) in predictors.items():
        values = predictor.predict(list(archs.values()))
        for arch_json, value in zip(archs, values.tolist(), strict=True):
            results[arch_json][name] = {
                "median_ms": value,
                "p10_ms": value,
                "p90_ms": value,
                "cv": 0.0,
                "samples": 0,
                "stable": True,
                "seconds": 0.0,
                "fingerprint": fingerprints[name],
                "predicted": True,
                "predictor": predictor.name,
                "profile": folder,
                "statistic": statistic,
            }
    return results


def check_front(
    run_dir: Path, study: Any, settings: SearchSettings, pool: Pool, fingerprints: dict[str, dict[str, Any]], cache: LatencyCache, measure: Measure
) -> dict[str, Any]:
    """Measure every member of the predicted-latency fronts (re-exported by the evaluators, measured interleaved, kept in
    the latency cache) and write ``search/front_check.json``: per target, per member, the predicted and the measured
    latency, the relative error and whether the measurement breaks the target's latency limit, both on the statistic the
    profile predicts (``p10`` or ``median``; the measurement keeps both)."""
    members = {name: pareto_front(study, name) for name in settings.targets}
    arch_jsons = list(dict.fromkeys(trial.user_attrs["arch"] for front in members.values() for trial in front))
    evaluations = {outcome.arch_json: outcome.evaluation for outcome in pool.map(arch_jsons) if outcome.evaluation is not None}
    measured = _measure_batch(evaluations, settings, fingerprints, cache, measure)
    limits = dict(settings.latency_limits)
    report: dict[str, Any] = {"targets": {}}
    for name, front in members.items():
        rows = []
        for trial in front:
            arch_json = trial.user_attrs["arch"]
            recorded = trial.user_attrs[latency_key(name)]
            predicted = float(recorded["median_ms"])
            statistic = recorded.get("statistic", "median")
            measurement = measured.get(arch_json, {}).get(name)
            value = None if measurement is None else float(measurement[f"{statistic}_ms"])
            limit = limits.get(name)
            rows.append(
                {
                    "trial": trial.number,
                    "arch": arch_json,
                    "predicted_ms": predicted,
                    "statistic": statistic,
                    "measured": measurement,
                    "relative_error": None if value is None else (predicted - value) / value,
                    "limit_ms": limit,
                    "breaks_limit": bool(limit is not None and value is not None and value > limit),
                }
            )
        report["targets"][name] = rows
        broken = [row["trial"] for row in rows if row["breaks_limit"]]
        if broken:
            logger.warning("front on %s: trial(s) %s were predicted within %s ms but measured above it", name, broken, limits[name])
    jsonio.write(RunDir(run_dir).front_check, report, nonfinite="null")
    return report


def _default_measure(settings: SearchSettings) -> Measure:
    from nas.latency.protocol import measure_latency
    from nas.latency.targets import resolve_target

    targets = {name: resolve_target(name, threads=settings.threads, batch_size=settings.batch_size) for name in settings.targets}

    def measure(models: dict[tuple[str, str], bytes]) -> dict[tuple[str, str], Any]:
        """``{(arch_json, target name): model bytes}`` measured interleaved in one call."""
        results = measure_latency(models, {key: targets[key[1]] for key in models}, max_seconds=settings.measure_seconds * len(models), seed=settings.seed)
        return {key: value.to_dict() for key, value in results.items()}

    return measure


def _measure_batch(
    evaluations: dict[str, Evaluation],
    settings: SearchSettings,
    fingerprints: dict[str, dict[str, Any]],
    cache: LatencyCache,
    measure: Measure,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per arch, per target: the measurement from the cache, else measured now. Every (arch, target) pair the cache
    lacks is measured in one interleaved call, so a batch's archs and an arch's fp32 and INT8 models are compared
    under the same machine load."""
    from nas.latency.fingerprint import fingerprint_key
    from nas.latency.targets import get_target

    results: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in evaluations}
    keys = {name: fingerprint_key(fingerprints[name]) for name in settings.targets}
    missing: dict[tuple[str, str], bytes] = {}
    for name in settings.targets:
        kind = get_target(name).model_kind
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


__all__ = ["SearchResult", "build_payload", "run_search"]
