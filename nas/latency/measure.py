"""Latency measured through ONNX Runtime: targets, the measurement protocol, the device fingerprint, op-type profiles.

Every figure is measured, never inferred, and carries the fingerprint of where and how it was taken.

Protocol of :func:`measure_latency` (several candidates measured side by side in one process):

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
   ``min_seconds`` (default 1 s, or ``max_seconds`` if that is shorter): it stops (``stable=True``) when it has at least ``min_repeats`` samples and the median of the
   first half of its samples and the median of the second half differ by at most ``rel_tolerance`` of the median
   of all of them (no drift between the halves). A candidate also stops at ``max_repeats`` samples, and every
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

import difflib
import functools
import gc
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

ModelSource = str | Path | bytes
"""An ONNX model: a file path or the serialized ``ModelProto`` bytes."""

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MIN_SECONDS = 1.0
QUANTIZE_KIND = "Quantize/Dequantize"
DEPTHWISE_CONV_KIND = "Conv (depthwise)"
DENSE_CONV_KIND = "Conv (dense)"

INFERENCE_CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "bf16",
)
"""CPU flags (``/proc/cpuinfo`` names) that change which ONNX Runtime / MLAS kernels run."""

FINGERPRINT_KEY_FIELDS = (
    "cpu_model",
    "cpu_flags",
    "logical_cores",
    "machine",
    "onnxruntime_version",
    "provider",
    "precision",
    "threads",
    "batch_size",
    "input_shape",
    "input_dtype",
    "quantization",
)
"""Fingerprint fields that :func:`fingerprint_key` hashes (plus ``gpu`` for GPU providers)."""

_REQUIRED_FINGERPRINT_FIELDS = ("cpu_model", "onnxruntime_version", "provider", "precision", "threads", "batch_size")
_QUANTIZATION_LATENCY_FIELDS = ("format", "activation_type", "weight_type", "per_channel", "reduce_range")


class LatencyError(ValueError):
    """A latency request that cannot be honoured (unknown or unavailable target, unreadable model, bad argument)."""


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("latency measurement needs onnxruntime: pip install 'onnxruntime>=1.18'") from error
    return onnxruntime


@dataclass(frozen=True, slots=True)
class LatencyTarget:
    """Where and how a latency is measured.

    Attributes:
        name: the target's name (``"cpu_fp32"``, ...), recorded in fingerprints.
        provider: ONNX Runtime execution provider (``"CPUExecutionProvider"``, ``"CUDAExecutionProvider"``,
            ``"TensorrtExecutionProvider"``).
        precision: ``"fp32"``, ``"fp16"`` (TensorRT builds an fp16 engine from the fp32 file) or ``"int8"``.
        threads: intra-op threads of the session.
        batch_size: ``B`` of the measured input.
    """

    name: str
    provider: str
    precision: Literal["fp32", "fp16", "int8"]
    threads: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise LatencyError(f"LatencyTarget.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        for name in ("threads", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LatencyError(f"LatencyTarget.{name} must be an integer >= 1, got {value!r}")
        if not self.provider:
            raise LatencyError("LatencyTarget.provider must name an ONNX Runtime execution provider")

    @property
    def model_kind(self) -> Literal["fp32", "int8"]:
        """Which exported file this target measures: ``"int8"`` (``*.int8.onnx``) or ``"fp32"`` (``*.onnx``)."""
        return "int8" if self.precision == "int8" else "fp32"

    def providers(self) -> list[str | tuple[str, dict[str, Any]]]:
        """The ``providers`` argument of ``onnxruntime.InferenceSession`` for this target, fallbacks last."""
        if self.provider == TENSORRT_PROVIDER:
            options = {"device_id": 0, "trt_fp16_enable": self.precision == "fp16", "trt_int8_enable": False}
            return [(TENSORRT_PROVIDER, options), (CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]
        if self.provider == CUDA_PROVIDER:
            return [(CUDA_PROVIDER, {"device_id": 0}), CPU_PROVIDER]
        if self.provider == CPU_PROVIDER:
            return [CPU_PROVIDER]
        return [self.provider, CPU_PROVIDER]


TARGET_NAMES = ("cpu_fp32", "cpu_int8", "cuda_fp32", "tensorrt_fp16")
"""The built-in target names (``builtin_targets``); the YAML schema validates ``search.targets`` against them."""


def builtin_targets() -> dict[str, LatencyTarget]:
    """Every built-in target (one thread, batch 1), whether or not this machine can run it."""
    targets = {
        "cpu_fp32": LatencyTarget("cpu_fp32", CPU_PROVIDER, "fp32"),
        "cpu_int8": LatencyTarget("cpu_int8", CPU_PROVIDER, "int8"),
        "cuda_fp32": LatencyTarget("cuda_fp32", CUDA_PROVIDER, "fp32"),
        "tensorrt_fp16": LatencyTarget("tensorrt_fp16", TENSORRT_PROVIDER, "fp16"),
    }
    assert tuple(targets) == TARGET_NAMES
    return targets


def available_targets() -> list[str]:
    """Names of the built-in targets whose provider this onnxruntime offers (``get_available_providers()``)."""
    providers = set(_onnxruntime().get_available_providers())
    return [name for name, target in builtin_targets().items() if target.provider in providers]


def resolve_target(name: str, threads: int = 1, batch_size: int = 1) -> LatencyTarget:
    """The built-in target ``name`` with ``threads`` and ``batch_size``.

    Raises:
        LatencyError: an unknown name (with a "did you mean"), or a target whose provider this onnxruntime lacks.
    """
    targets = builtin_targets()
    if name not in targets:
        close = difflib.get_close_matches(name, list(targets), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise LatencyError(f"latency target must be one of {sorted(targets)}, got {name!r}{hint}")
    target = targets[name]
    providers = _onnxruntime().get_available_providers()
    if target.provider not in providers:
        raise LatencyError(
            f"latency target {name!r} needs {target.provider}, which this onnxruntime "
            f"{_onnxruntime().__version__} does not provide (providers: {providers}); "
            f"available targets: {available_targets()}"
        )
    return LatencyTarget(target.name, target.provider, target.precision, threads=threads, batch_size=batch_size)


@functools.cache
def _cpu_description() -> tuple[str, tuple[str, ...]]:
    """``(model name, inference-relevant flags)`` of this CPU."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    model = model or platform.processor() or platform.machine() or "unknown"
    return model, tuple(flag for flag in INFERENCE_CPU_FLAGS if flag in flags)


@functools.cache
def gpu_name() -> str | None:
    """Name of GPU 0 from ``nvidia-smi``, or ``None`` when there is none (or no ``nvidia-smi``)."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    try:
        completed = subprocess.run(
            [executable, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        logger.info("nvidia-smi failed: %s", error)
        return None
    names = [line.strip() for line in completed.stdout.splitlines() if line.strip()]
    return names[0] if completed.returncode == 0 and names else None


def device_fingerprint(
    target: LatencyTarget,
    *,
    input_shape: Sequence[int] | None = None,
    input_dtype: str | None = None,
    quantization: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Where and how a figure is measured (JSON-safe); stored with every :class:`Measurement`.

    Args:
        target: provider, precision, threads and batch size.
        input_shape: the measured input's full shape, batch first (``[B, C, H, W]`` or ``[B, L]``).
        input_dtype: its numpy dtype name (``"float32"``, ``"int64"``).
        quantization: the model's ``nasforge_quantization`` metadata (INT8 files).

    Returns:
        ``cpu_model``, ``cpu_flags`` (the inference-relevant ones, see ``INFERENCE_CPU_FLAGS``), ``logical_cores``,
        ``machine``, ``gpu`` (``None`` without one), ``onnxruntime_version``, ``target``, ``provider``,
        ``precision``, ``threads``, ``batch_size``, ``input_shape``, ``input_dtype``, ``quantization``.
    """
    cpu_model, cpu_flags = _cpu_description()
    return {
        "cpu_model": cpu_model,
        "cpu_flags": list(cpu_flags),
        "logical_cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "gpu": gpu_name(),
        "onnxruntime_version": _onnxruntime().__version__,
        "target": target.name,
        "provider": target.provider,
        "precision": target.precision,
        "threads": target.threads,
        "batch_size": target.batch_size,
        "input_shape": None if input_shape is None else [int(size) for size in input_shape],
        "input_dtype": input_dtype,
        "quantization": None if quantization is None else dict(quantization),
    }


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash (16 hex digits) of the fingerprint fields that affect latency, for keying caches.

    Hashed: ``FINGERPRINT_KEY_FIELDS`` (absent ones as ``None``; of ``quantization`` only format, types,
    per-channel and reduce_range) and, for GPU providers, ``gpu``. Not hashed: the target's name, and the GPU
    name on the CPU provider.

    Raises:
        LatencyError: a required field (``cpu_model``, ``onnxruntime_version``, ``provider``, ``precision``,
            ``threads``, ``batch_size``) is missing.
    """
    missing = [name for name in _REQUIRED_FINGERPRINT_FIELDS if name not in fingerprint]
    if missing:
        raise LatencyError(f"fingerprint lacks the field(s) {missing} (has {sorted(fingerprint)})")
    keyed: dict[str, Any] = {name: fingerprint.get(name) for name in FINGERPRINT_KEY_FIELDS}
    if isinstance(keyed["quantization"], Mapping):
        keyed["quantization"] = {
            name: keyed["quantization"][name] for name in _QUANTIZATION_LATENCY_FIELDS if name in keyed["quantization"]
        }
    if fingerprint["provider"] != CPU_PROVIDER:
        keyed["gpu"] = fingerprint.get("gpu")
    text = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        fingerprint: :func:`device_fingerprint` of the measurement.
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
        values["fingerprint"] = json.loads(json.dumps(self.fingerprint))
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


def _load_proto(model: ModelSource) -> Any:
    """The ``onnx.ModelProto`` of ``model`` without external data."""
    import onnx

    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def _check_source(model: ModelSource, what: str) -> ModelSource:
    if isinstance(model, bytes):
        if not model:
            raise LatencyError(f"{what}: the model bytes are empty")
        return model
    if not isinstance(model, str | Path):
        raise LatencyError(f"{what} must be a path or serialized ONNX bytes, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise LatencyError(f"{what}: no ONNX file at {path}")
    return path


def _session_options(target: LatencyTarget) -> Any:
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = target.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _create_session(model: ModelSource, target: LatencyTarget, options: Any, what: str) -> Any:
    """An ``InferenceSession`` of ``model`` on ``target``'s provider (checked: no silent CPU fallback)."""
    onnxruntime = _onnxruntime()
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = onnxruntime.InferenceSession(source, options, providers=target.providers())
    except Exception as error:
        raise LatencyError(f"{what}: ONNX Runtime cannot load it on {target.provider}: {error}") from error
    active = session.get_providers()
    if not active or active[0] != target.provider:
        raise LatencyError(
            f"{what}: the session runs on {active} instead of {target.provider} (the provider failed to "
            "initialise; check the CUDA / TensorRT libraries)"
        )
    return session


_NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _vocabulary_size(model: ModelSource, input_name: str) -> int | None:
    """Rows of the embedding table that the token input indexes (a ``Gather`` of an initializer), if any."""
    proto = _load_proto(model)
    initializers = {tensor.name: list(tensor.dims) for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == input_name:
            shape = initializers.get(node.input[0])
            if shape:
                return int(shape[0])
    return None


def _model_input(
    session: Any,
    model: ModelSource,
    target: LatencyTarget,
    *,
    input_shape: Sequence[int] | None,
    vocab_size: int | None,
    seed: int,
    what: str,
) -> tuple[str, np.ndarray]:
    """``(input name, array)``: the fixed input ``[B, ...]`` of ``target.batch_size`` for ``session``."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise LatencyError(f"{what}: latency models take exactly one input, this one takes {[i.name for i in inputs]}")
    metadata = inputs[0]
    dtype = _NUMPY_DTYPES.get(metadata.type)
    if dtype is None:
        raise LatencyError(f"{what}: input {metadata.name!r} has type {metadata.type}; supported: {list(_NUMPY_DTYPES)}")
    declared = list(metadata.shape)
    if not declared:
        raise LatencyError(f"{what}: input {metadata.name!r} is a scalar; expected [B, ...]")
    if isinstance(declared[0], int) and declared[0] != target.batch_size:
        raise LatencyError(
            f"{what}: the model's batch axis is fixed to {declared[0]}, the target's batch_size is "
            f"{target.batch_size}"
        )
    if input_shape is not None:
        shape = [int(size) for size in input_shape]
        if len(shape) != len(declared) - 1 or any(size < 1 for size in shape):
            raise LatencyError(
                f"{what}: input_shape (without the batch axis) must have {len(declared) - 1} positive sizes for "
                f"an input declared {declared}, got {list(input_shape)}"
            )
        for axis, (size, declared_size) in enumerate(zip(shape, declared[1:], strict=True), start=1):
            if isinstance(declared_size, int) and declared_size != size:
                raise LatencyError(f"{what}: input_shape axis {axis} is {size}, the model fixes it to {declared_size}")
    else:
        symbolic = [size for size in declared[1:] if not isinstance(size, int)]
        if symbolic:
            raise LatencyError(
                f"{what}: input {metadata.name!r} {declared} has symbolic sizes {symbolic} besides the batch axis; "
                "pass input_shape"
            )
        shape = [int(size) for size in declared[1:]]
    full_shape = (target.batch_size, *shape)
    generator = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return metadata.name, generator.standard_normal(full_shape).astype(dtype)
    vocabulary = vocab_size if vocab_size is not None else _vocabulary_size(model, metadata.name)
    if vocabulary is None or vocabulary < 1:
        raise LatencyError(
            f"{what}: cannot tell the vocabulary size of the token input {metadata.name!r} (no embedding Gather "
            "of an initializer); pass vocab_size"
        )
    return metadata.name, generator.integers(0, vocabulary, size=full_shape, dtype=dtype)


def _quantization_metadata(session: Any, target: LatencyTarget, what: str) -> dict[str, Any] | None:
    """The model's ``nasforge_quantization`` metadata; raises when a nasforge file does not match the target."""
    metadata = session.get_modelmeta().custom_metadata_map
    quantization = metadata.get("nasforge_quantization")
    if quantization is not None and target.model_kind == "fp32":
        raise LatencyError(f"{what} is an INT8 model; target {target.name!r} measures the fp32 file (*.onnx)")
    if quantization is None and "nasforge_version" in metadata and target.model_kind == "int8":
        raise LatencyError(f"{what} is an fp32 model; target {target.name!r} measures the INT8 file (*.int8.onnx)")
    if quantization is None:
        return None
    try:
        return dict(json.loads(quantization))
    except (ValueError, TypeError):
        return {"raw": quantization}


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
        raise LatencyError(
            f"min_seconds must be between 0 and max_seconds ({values['max_seconds']!r}), got {values['min_seconds']!r}"
        )
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
            source = _check_source(model, what)
            session = _create_session(source, target, _session_options(target), what)
            quantization = _quantization_metadata(session, target, what)
            input_name, array = _model_input(
                session, source, target, input_shape=input_shape, vocab_size=vocab_size, seed=seed, what=what
            )
            fingerprint = device_fingerprint(
                target, input_shape=array.shape, input_dtype=str(array.dtype), quantization=quantization
            )
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
            key, targets[key].name, measurement.median_ms, measurement.p10_ms, measurement.p90_ms, measurement.cv,
            measurement.samples, "stable" if measurement.stable else "NOT stable",
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


_FLOAT_OP_OF = {
    "Conv": "Conv",
    "QLinearConv": "Conv",
    "ConvInteger": "Conv",
    "FusedConv": "Conv",
    "NhwcConv": "Conv",
    "NhwcFusedConv": "Conv",
    "MatMul": "MatMul",
    "QLinearMatMul": "MatMul",
    "MatMulInteger": "MatMul",
    "MatMulIntegerToFloat": "MatMul",
    "DynamicQuantizeMatMul": "MatMul",
    "FusedMatMul": "MatMul",
    "MatMulNBits": "MatMul",
    "Gemm": "Gemm",
    "QGemm": "Gemm",
    "FusedGemm": "Gemm",
    "QuantizeLinear": QUANTIZE_KIND,
    "DequantizeLinear": QUANTIZE_KIND,
    "DynamicQuantizeLinear": QUANTIZE_KIND,
    "BiasGelu": "Gelu",
    "FastGelu": "Gelu",
    "QuickGelu": "Gelu",
    "BiasSoftmax": "Softmax",
    "BiasAdd": "Add",
    "SkipLayerNormalization": "LayerNormalization",
    "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
    "NhwcMaxPool": "MaxPool",
    "QAttention": "Attention",
    "MultiHeadAttention": "Attention",
    "ReorderInput": "Reorder (NCHWc)",
    "ReorderOutput": "Reorder (NCHWc)",
}
"""Op type in an optimized graph -> the float op (or overhead) it implements. Other ``QLinear<Op>`` map to ``<Op>``,
everything else to itself."""

_CONV_WEIGHT_INPUT = {"Conv": 1, "FusedConv": 1, "NhwcConv": 1, "NhwcFusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}


def float_op_kind(op_type: str) -> str:
    """The float op (or ``"Quantize/Dequantize"``) that an op type of an optimized (possibly INT8) graph
    implements: ``QLinearConv`` -> ``Conv``, ``MatMulIntegerToFloat`` -> ``MatMul``, ``QGemm`` -> ``Gemm``,
    ``BiasGelu`` -> ``Gelu``, ``QLinearAdd`` -> ``Add``, ... Convolutions are split further by
    :func:`op_type_profile`."""
    if op_type in _FLOAT_OP_OF:
        return _FLOAT_OP_OF[op_type]
    if op_type.startswith("QLinear") and len(op_type) > len("QLinear"):
        return op_type.removeprefix("QLinear")
    return op_type


@dataclass(frozen=True, slots=True)
class _NodeInfo:
    op_type: str
    group: int
    weight_shape: tuple[int, ...] | None


def _graph_nodes(path: Path) -> dict[str, _NodeInfo]:
    """Node name -> op type, ``group`` and convolution weight shape, over the optimized graph at ``path``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    nodes: dict[str, _NodeInfo] = {}

    def visit(graph: Any) -> None:
        shapes = {tensor.name: tuple(int(size) for size in tensor.dims) for tensor in graph.initializer}
        for value in graph.value_info:
            dims = value.type.tensor_type.shape.dim
            if dims and all(dim.HasField("dim_value") for dim in dims):
                shapes.setdefault(value.name, tuple(int(dim.dim_value) for dim in dims))
        for node in graph.node:
            group = 1
            for attribute in node.attribute:
                if attribute.name == "group":
                    group = int(onnx.helper.get_attribute_value(attribute))
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for subgraph in attribute.graphs:
                        visit(subgraph)
            weight_index = _CONV_WEIGHT_INPUT.get(node.op_type)
            weight_shape = None
            if weight_index is not None and len(node.input) > weight_index:
                weight_shape = shapes.get(node.input[weight_index])
            nodes[node.name] = _NodeInfo(node.op_type, group, weight_shape)

    visit(proto.graph)
    return nodes


def _event_weight_shape(event: Mapping[str, Any], index: int) -> tuple[int, ...] | None:
    """Shape of input ``index`` as recorded in a profiler node event (``args.input_type_shape``)."""
    shapes = event.get("args", {}).get("input_type_shape", [])
    if index < len(shapes) and isinstance(shapes[index], Mapping) and shapes[index]:
        return tuple(int(size) for size in next(iter(shapes[index].values())))
    return None


def _node_kind(op_type: str, node: _NodeInfo | None, event: Mapping[str, Any]) -> str:
    kind = float_op_kind(op_type)
    if kind != "Conv" or op_type not in _CONV_WEIGHT_INPUT:
        return kind
    weight_shape = node.weight_shape if node is not None else None
    if weight_shape is None:
        weight_shape = _event_weight_shape(event, _CONV_WEIGHT_INPUT[op_type])
    group = node.group if node is not None else 1
    if group > 1 and weight_shape is not None and len(weight_shape) >= 2 and weight_shape[1] == 1:
        return DEPTHWISE_CONV_KIND
    return DENSE_CONV_KIND


def op_type_profile(
    model: ModelSource,
    target: LatencyTarget,
    *,
    runs: int = 20,
    warmup: int = 5,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Mean microseconds per run spent in each kind of op, from ONNX Runtime's profiler.

    A separate profiling session (never the one latency is measured with; profiling slows every node down a
    little) runs ``warmup`` then ``runs`` times on the same kind of input as :func:`measure_latency`; only the
    node events (``"cat": "Node"``, ``"<node name>_kernel_time"``) that fall inside the last ``runs``
    ``model_run`` events are counted. The optimized graph is saved next to the trace so that each event's node is
    looked up by name: convolutions become ``"Conv (depthwise)"`` (``group`` > 1 and one input channel per group,
    i.e. ``group`` equals the input channels) or ``"Conv (dense)"``; other ops map to the float op they implement
    (:func:`float_op_kind`: ``QLinearConv`` -> Conv, ``MatMulIntegerToFloat`` -> ``MatMul``, ``QGemm`` ->
    ``Gemm``, ``QuantizeLinear`` / ``DequantizeLinear`` -> ``"Quantize/Dequantize"``, ...). Fused nodes count
    under their main op (ORT's NCHWc ``Conv`` with a fused activation is all ``Conv``). The trace and the graph
    are written to a temporary folder that is removed afterwards.

    Args:
        model: ONNX file path or serialized model (``*.int8.onnx`` for INT8 targets).
        target: provider, precision, threads and batch size.
        runs: profiled runs averaged over.
        warmup: runs before them, not counted.
        seed, input_shape, vocab_size: as for :func:`measure_latency`.

    Returns:
        kind -> mean microseconds per run, largest first.
    """
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LatencyError(f"{name} must be an integer >= {low}, got {value!r}")
    source = _check_source(model, "profiled model")
    with tempfile.TemporaryDirectory(prefix="nasforge-profile-") as scratch:
        options = _session_options(target)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        optimized = Path(scratch) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        session = _create_session(source, target, options, "profiled model")
        try:
            _quantization_metadata(session, target, "profiled model")
            input_name, array = _model_input(
                session, source, target, input_shape=input_shape, vocab_size=vocab_size, seed=seed,
                what="profiled model",
            )
            output_names = [output.name for output in session.get_outputs()]
            for _ in range(warmup + runs):
                session.run(output_names, {input_name: array})
            trace = Path(session.end_profiling())
        finally:
            del session
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
        nodes = _graph_nodes(optimized) if optimized.is_file() else {}
    model_runs = sorted((event["ts"], event["ts"] + event["dur"]) for event in events if event.get("name") == "model_run")
    if len(model_runs) != warmup + runs:
        logger.warning("profile: expected %d model_run events, found %d", warmup + runs, len(model_runs))
    windows = model_runs[-runs:]
    if not windows:
        raise LatencyError("the ONNX Runtime profile holds no model_run events")
    begin, end = windows[0][0], windows[-1][1]
    totals: dict[str, float] = {}
    unmatched: set[str] = set()
    suffix = "_kernel_time"
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(suffix) or not begin <= event.get("ts", -1) <= end:
            continue
        node_name = name.removesuffix(suffix)
        op_type = event.get("args", {}).get("op_name") or (nodes[node_name].op_type if node_name in nodes else "")
        node = nodes.get(node_name)
        if node is None:
            unmatched.add(node_name)
        kind = _node_kind(op_type or "unknown", node, event)
        totals[kind] = totals.get(kind, 0.0) + float(event.get("dur", 0))
    if unmatched:
        logger.info("profile: %d profiled node(s) not found in the optimized graph: %s", len(unmatched), sorted(unmatched)[:5])
    return dict(sorted(((kind, total / len(windows)) for kind, total in totals.items()), key=lambda item: (-item[1], item[0])))


@dataclass(frozen=True, slots=True)
class OpTypeComparison:
    """Time per run of one kind of op in the fp32 and the INT8 model.

    Attributes:
        kind: op kind (see :func:`op_type_profile`).
        fp32_us: mean microseconds per run in the fp32 model (0 when the kind only occurs in INT8, e.g.
            ``"Quantize/Dequantize"``).
        int8_us: the same in the INT8 model (0 when the kind only occurs in fp32).
        speedup: ``fp32_us / int8_us`` (``inf`` when ``int8_us`` is 0; 0 for INT8-only kinds).
    """

    kind: str
    fp32_us: float
    int8_us: float
    speedup: float


def compare_op_types(fp32_profile: Mapping[str, float], int8_profile: Mapping[str, float]) -> list[OpTypeComparison]:
    """Per op kind, fp32 vs INT8 time per run, sorted by the larger of the two, descending (then by kind)."""
    rows = []
    for kind in set(fp32_profile) | set(int8_profile):
        fp32_us = float(fp32_profile.get(kind, 0.0))
        int8_us = float(int8_profile.get(kind, 0.0))
        speedup = fp32_us / int8_us if int8_us > 0 else math.inf
        rows.append(OpTypeComparison(kind=kind, fp32_us=fp32_us, int8_us=int8_us, speedup=speedup))
    return sorted(rows, key=lambda row: (-max(row.fp32_us, row.int8_us), row.kind))


__all__ = [
    "DEFAULT_MIN_SECONDS",
    "FINGERPRINT_KEY_FIELDS",
    "INFERENCE_CPU_FLAGS",
    "QUANTIZE_KIND",
    "LatencyError",
    "LatencyTarget",
    "Measurement",
    "OpTypeComparison",
    "available_targets",
    "builtin_targets",
    "compare_op_types",
    "device_fingerprint",
    "fingerprint_key",
    "float_op_kind",
    "gpu_name",
    "is_stable",
    "measure_latency",
    "op_type_profile",
    "resolve_target",
    "robust_cv",
]
