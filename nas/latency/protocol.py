"""The latency measurement protocol: several ONNX models measured side by side, interleaved, in one process.

Every figure is measured, never inferred, and carries the fingerprint of where and how it was taken
(``nas.latency.fingerprint``). Protocol of :func:`measure_latency`:

1. One ONNX Runtime session per candidate: ``threads`` intra-op threads (default 1), one inter-op thread,
   ``ORT_SEQUENTIAL``, ``ORT_ENABLE_ALL`` graph optimisation. The ``"batch"`` axis stays dynamic, as exported: fixing
   it (``add_free_dimension_override_by_name``) lets ORT 1.32 rewrite QDQ ``MatMul`` + ``Add`` into a float ``Gemm``
   fed by per-run ``DequantizeLinear`` of the weights instead of ``MatMulIntegerToFloat``, which would measure an
   INT8 model that no deployment runs. After creation the session must run on the target's provider (ONNX Runtime
   falls back to the CPU silently when a GPU provider fails to load; here that is an error).
2. One fixed input per candidate, drawn from ``numpy.random.default_rng(seed)``: float32 images ``[B, C, H, W]``
   from a standard normal, or int64 token ids ``[B, L]`` uniform in ``[0, vocab_size)``; dtype and shape are read
   from the session's input metadata (or given as ``input_shape``), the vocabulary from the embedding ``Gather``.
3. ``warmup`` untimed runs per candidate.
4. Interleaved rounds: each round runs, for every unfinished candidate in turn, one block of ``rewarm`` untimed
   runs then ``block`` runs each timed with ``time.perf_counter_ns`` around ``session.run``. The order of the
   candidates is rotated by one every round, so no candidate always follows the same one (with two candidates
   this is the ABBA design) and slow drift of the machine is spread over all of them. The untimed ``rewarm`` runs
   absorb the cache and thread-pool state the previous candidate left behind. Python's garbage collector is off
   while timing.
5. Stability rule, checked for each candidate after each of its blocks once the interleaved phase has run
   ``min_seconds`` (default 1 s, or ``max_seconds`` if that is shorter): it stops (``stable=True``) when it has at
   least ``min_repeats`` samples and the median of the first half of its samples and the median of the second half
   differ by at most ``rel_tolerance`` of the median of all of them (no drift between the halves). A candidate also stops at ``max_repeats`` samples, and every
   candidate stops when the interleaved phase has run ``max_seconds`` (the first round always completes); those
   stop with ``stable=False``. ``min_seconds`` is there because the noise of a shared machine comes in regimes
   that last about a second (on the 2-core development VM a model ran 1.8x slower for 0.5-2 s stretches while
   other jobs ran): 20 samples of a 0.1 ms model span 2 ms, all in one regime, and agree with each other however
   far that regime is from the next process's. ``benchmarks/latency_stability.py`` measures what this buys.
6. Reported per candidate: median, p10, p90 (``numpy.percentile``, linear) of all timed samples, and the robust
   coefficient of variation ``cv = 1.4826 * MAD / median`` (MAD: median absolute deviation from the median;
   1.4826 * MAD estimates the standard deviation of normal data, and unlike ``std / mean`` it is not inflated by
   the rare long samples a shared machine produces when the process is preempted). The p10 is the figure to compare
   between processes on a shared machine: it tracks the uncontended latency, while the median moves with the
   share of the measurement that fell into slow regimes (``benchmarks/README.md``: across five processes under
   load, p10 varied by 1.2 %, the median by 9-15 %, the interleaved ratio of two models' medians by 2-7 %).

``session.run`` is called with numpy arrays: on GPU providers the time includes copying the input to the device and
the output back, as a caller of the model would see it.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

import numpy as np

from nas import jsonio
from nas.latency.fingerprint import device_fingerprint
from nas.latency.sessions import ModelSource, check_source, create_session, model_input, quantization_metadata, session_options
from nas.latency.targets import LatencyError, LatencyTarget

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

DEFAULT_MIN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Measurement:
    """The latency of one model on one target, with its spread and where it was measured.

    Attributes:
        median_ms: median of the timed runs, milliseconds per ``session.run`` of a batch of ``batch_size``.
        p10_ms: 10th percentile.
        p90_ms: 90th percentile.
        cv: robust coefficient of variation, ``1.4826 * MAD / median`` over the timed runs.
        samples: number of timed runs.
        stable: whether the stability rule stopped it (rather than ``max_seconds`` or ``max_repeats``).
            ``p10_ms`` is the figure to compare between runs on a shared machine (it tracks the uncontended
            latency), ``median_ms`` the typical latency under the load of the moment.
        seconds: wall-clock seconds spent running this model (warm-up, re-warm and timed runs).
        fingerprint: :func:`nas.latency.fingerprint.device_fingerprint` of the measurement.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float
    samples: int
    stable: bool
    seconds: float
    fingerprint: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``from_dict`` reads it back)."""
        values = asdict(self)
        values["fingerprint"] = json.loads(jsonio.dumps(self.fingerprint))
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Measurement:
        """Read ``to_dict``'s output. Raises ``LatencyError`` on missing or unknown keys."""
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in values]
        unknown = sorted(set(values) - set(names))
        if missing or unknown:
            raise LatencyError(f"Measurement dict: missing keys {missing}, unknown keys {unknown}")
        return cls(
            median_ms=float(values["median_ms"]),
            p10_ms=float(values["p10_ms"]),
            p90_ms=float(values["p90_ms"]),
            cv=float(values["cv"]),
            samples=int(values["samples"]),
            stable=bool(values["stable"]),
            seconds=float(values["seconds"]),
            fingerprint=dict(values["fingerprint"]),
        )


def robust_cv(samples: Sequence[float] | np.ndarray) -> float:
    """``1.4826 * MAD / median`` of ``samples`` (0 for fewer than two samples)."""
    values = np.asarray(samples, dtype=np.float64)
    if len(values) < 2:
        return 0.0
    median = float(np.median(values))
    if median <= 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(values - median)) / median)


def is_stable(samples: Sequence[float] | np.ndarray, *, min_repeats: int, rel_tolerance: float) -> bool:
    """The stability rule: at least ``min_repeats`` samples, and the medians of the first and second halves differ
    by at most ``rel_tolerance`` of the overall median."""
    values = np.asarray(samples, dtype=np.float64)
    if len(values) < max(min_repeats, 2):
        return False
    half = len(values) // 2
    first, second, overall = np.median(values[:half]), np.median(values[half:]), np.median(values)
    return bool(abs(second - first) <= rel_tolerance * overall)


@dataclass(slots=True)
class _Candidate:
    session: Any
    output_names: list[str]
    feed: dict[str, np.ndarray]
    fingerprint: dict[str, Any]
    samples_ns: list[int]
    seconds: float = 0.0
    finished: bool = False
    stable: bool = False

    def run_untimed(self, count: int) -> None:
        started = time.perf_counter()
        for _ in range(count):
            self.session.run(self.output_names, self.feed)
        self.seconds += time.perf_counter() - started

    def run_timed(self, count: int) -> None:
        started = time.perf_counter()
        for _ in range(count):
            begin = time.perf_counter_ns()
            self.session.run(self.output_names, self.feed)
            self.samples_ns.append(time.perf_counter_ns() - begin)
        self.seconds += time.perf_counter() - started


def _summarise(candidate: _Candidate) -> Measurement:
    milliseconds = np.asarray(candidate.samples_ns, dtype=np.float64) / 1e6
    return Measurement(
        median_ms=float(np.median(milliseconds)),
        p10_ms=float(np.percentile(milliseconds, 10)),
        p90_ms=float(np.percentile(milliseconds, 90)),
        cv=robust_cv(milliseconds),
        samples=len(milliseconds),
        stable=candidate.stable,
        seconds=candidate.seconds,
        fingerprint=candidate.fingerprint,
    )


def _check_protocol(**values: float) -> None:
    limits = {"warmup": 0, "rewarm": 0, "block": 1, "min_repeats": 1, "max_repeats": 1}
    for name, low in limits.items():
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LatencyError(f"{name} must be an integer >= {low}, got {value!r}")
    if values["max_repeats"] < values["min_repeats"]:
        raise LatencyError(f"max_repeats ({values['max_repeats']}) must be >= min_repeats ({values['min_repeats']})")
    if not (math.isfinite(values["max_seconds"]) and values["max_seconds"] > 0):
        raise LatencyError(f"max_seconds must be a positive number, got {values['max_seconds']!r}")
    if not (math.isfinite(values["min_seconds"]) and 0 <= values["min_seconds"] <= values["max_seconds"]):
        raise LatencyError(f"min_seconds must be between 0 and max_seconds ({values['max_seconds']!r}), got {values['min_seconds']!r}")
    if not (math.isfinite(values["rel_tolerance"]) and values["rel_tolerance"] > 0):
        raise LatencyError(f"rel_tolerance must be a positive number, got {values['rel_tolerance']!r}")


def measure_latency(
    models: Mapping[K, ModelSource],
    target: LatencyTarget | Mapping[K, LatencyTarget],
    *,
    warmup: int = 10,
    block: int = 5,
    rewarm: int = 1,
    min_repeats: int = 20,
    max_repeats: int = 100_000,
    min_seconds: float | None = None,
    max_seconds: float = 5.0,
    rel_tolerance: float = 0.02,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    vocab_size: int | None = None,
    progress: Callable[[K, int, float], None] | None = None,
) -> dict[K, Measurement]:
    """Measure the latency of several models side by side, interleaved (see the module docstring for the protocol).

    Args:
        models: key -> ONNX file path or serialized model; each takes one input ``[B, C, H, W]`` float32 or
            ``[B, L]`` int64 whose first axis is the dynamic ``"batch"`` (or equals ``target.batch_size``).
            INT8 targets measure ``*.int8.onnx`` files, the others fp32 files.
        target: provider, precision, threads and batch size (``resolve_target``); or a mapping with a target per
            model key, so that e.g. the fp32 and the INT8 model of each candidate are measured interleaved in one
            call and their ratio sees the same stretches of machine load.
        warmup: untimed runs per model before the interleaved phase.
        block: timed runs per model per round.
        rewarm: untimed runs before each block.
        min_repeats: timed runs a model needs before the stability rule may stop it.
        max_repeats: timed runs after which a model stops (unstable) regardless.
        min_seconds: no model is declared stable before the interleaved phase has run this long; default
            ``min(DEFAULT_MIN_SECONDS, max_seconds)`` (1 s).
        max_seconds: wall-clock cap of the interleaved phase (after session creation and warm-up); the first round
            always completes, later the cap is checked after every block.
        rel_tolerance: allowed relative gap between the medians of the first and second halves of the samples.
        seed: seed of the ``numpy.random.Generator`` drawing each model's fixed input.
        input_shape: the input's shape without the batch axis (``[C, H, W]`` or ``[L]``), for models with symbolic
            sizes besides ``"batch"``; checked against the sizes a model fixes.
        vocab_size: token ids are drawn from ``[0, vocab_size)``; default: the rows of the embedding table the
            input indexes.
        progress: called after every block with ``(key, timed runs so far, seconds since the interleaved phase
            began)``.

    Returns:
        key -> :class:`Measurement`, in the order of ``models``.

    Raises:
        LatencyError: no models, a missing or unloadable model, a model that does not match the target's precision
            (nasforge files) or provider, an input that cannot be generated, or a bad protocol argument.
    """
    if min_seconds is None:
        min_seconds = min(DEFAULT_MIN_SECONDS, float(max_seconds))
    _check_protocol(
        warmup=warmup,
        rewarm=rewarm,
        block=block,
        min_repeats=min_repeats,
        max_repeats=max_repeats,
        min_seconds=float(min_seconds),
        max_seconds=float(max_seconds),
        rel_tolerance=float(rel_tolerance),
    )
    if not models:
        raise LatencyError("measure_latency needs at least one model")
    targets = _targets_of(models, target)
    candidates: dict[K, _Candidate] = {}
    try:
        for key, model in models.items():
            what = f"model {key!r}"
            target = targets[key]
            source = check_source(model, what)
            session = create_session(source, target, session_options(target), what)
            quantization = quantization_metadata(session, target, what)
            input_name, array = model_input(session, source, target, input_shape=input_shape, vocab_size=vocab_size, seed=seed, what=what)
            fingerprint = device_fingerprint(target, input_shape=array.shape, input_dtype=str(array.dtype), quantization=quantization)
            candidates[key] = _Candidate(
                session=session,
                output_names=[output.name for output in session.get_outputs()],
                feed={input_name: array},
                fingerprint=fingerprint,
                samples_ns=[],
            )
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for candidate in candidates.values():
                candidate.run_untimed(warmup)
            _interleave(
                candidates,
                block=block,
                rewarm=rewarm,
                min_repeats=min_repeats,
                max_repeats=max_repeats,
                min_seconds=float(min_seconds),
                max_seconds=float(max_seconds),
                rel_tolerance=float(rel_tolerance),
                progress=progress,
            )
        finally:
            if gc_was_enabled:
                gc.enable()
        results = {key: _summarise(candidate) for key, candidate in candidates.items()}
    finally:
        for candidate in candidates.values():
            candidate.session = None
        candidates.clear()
        gc.collect()
    for key, measurement in results.items():
        logger.info(
            "latency %r on %s: median %.4f ms [p10 %.4f, p90 %.4f], cv %.3f, %d samples, %s",
            key,
            targets[key].name,
            measurement.median_ms,
            measurement.p10_ms,
            measurement.p90_ms,
            measurement.cv,
            measurement.samples,
            "stable" if measurement.stable else "NOT stable",
        )
    return results


def _targets_of(models: Mapping[K, ModelSource], target: LatencyTarget | Mapping[K, LatencyTarget]) -> dict[K, LatencyTarget]:
    """``target`` for every model: one target for all, or a mapping with a target per model key."""
    if isinstance(target, LatencyTarget):
        return {key: target for key in models}
    if not isinstance(target, Mapping):
        raise LatencyError(f"target must be a LatencyTarget (see resolve_target) or a mapping of them, got {type(target).__name__}")
    missing = [key for key in models if key not in target]
    if missing:
        raise LatencyError(f"no target given for model(s) {missing}")
    for key in models:
        if not isinstance(target[key], LatencyTarget):
            raise LatencyError(f"target of model {key!r} must be a LatencyTarget (see resolve_target), got {type(target[key]).__name__}")
    return {key: target[key] for key in models}


def _interleave(
    candidates: Mapping[K, _Candidate],
    *,
    block: int,
    rewarm: int,
    min_repeats: int,
    max_repeats: int,
    min_seconds: float,
    max_seconds: float,
    rel_tolerance: float,
    progress: Callable[[K, int, float], None] | None,
) -> None:
    """Interleaved rounds until every candidate is finished (stable, ``max_repeats``) or ``max_seconds`` passed."""
    keys = list(candidates)
    started = time.perf_counter()
    round_index = 0
    while True:
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            candidate = candidates[key]
            if candidate.finished:
                continue
            if round_index > 0 and time.perf_counter() - started >= max_seconds:
                break
            candidate.run_untimed(rewarm)
            candidate.run_timed(min(block, max_repeats - len(candidate.samples_ns)))
            settled = time.perf_counter() - started >= min_seconds
            if settled and is_stable(candidate.samples_ns, min_repeats=min_repeats, rel_tolerance=rel_tolerance):
                candidate.finished = candidate.stable = True
            elif len(candidate.samples_ns) >= max_repeats:
                candidate.finished = True
                logger.info("latency %r: max_repeats %d reached before the median was stable", key, max_repeats)
            if progress is not None:
                progress(key, len(candidate.samples_ns), time.perf_counter() - started)
        round_index += 1
        if all(candidate.finished for candidate in candidates.values()):
            return
        if time.perf_counter() - started >= max_seconds:
            unstable = [key for key, candidate in candidates.items() if not candidate.finished]
            logger.info("latency: max_seconds %.3g reached with %d unstable model(s): %s", max_seconds, len(unstable), unstable)
            return


__all__ = ["DEFAULT_MIN_SECONDS", "Measurement", "is_stable", "measure_latency", "robust_cv"]
