"""Latency targets: where and how a latency is measured (execution provider, precision, threads, batch size).

Every target is an entry of ``TARGETS``, the one list of target names: the YAML schema, the search settings and the
CLI read it. The built-in targets register below; a user's own target registers from the user's plugin file::

    from nas.latency import LatencyTarget, register_target

    register_target(LatencyTarget("cpu_fp32_4_threads", "CPUExecutionProvider", "fp32", threads=4))

and is then named in ``search.targets`` like a built-in one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Literal

from nas.supernets.registry import Registry

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"

PRECISIONS = ("fp32", "fp16", "int8")


class LatencyError(ValueError):
    """A latency request that cannot be honoured (unknown or unavailable target, unreadable model, bad argument)."""


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` module, imported on first use; a missing one fails with the line that installs it."""
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
        if not isinstance(self.provider, str) or not self.provider:
            raise LatencyError(f"LatencyTarget.provider must name an ONNX Runtime execution provider, got {self.provider!r}")

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


TARGETS: Registry[LatencyTarget] = Registry("latency target")
"""Every latency target by name (built-in ones: one thread, batch 1), whether or not this machine can run it."""


def register_target(target: LatencyTarget, *, source: str | None = None, **metadata: Any) -> LatencyTarget:
    """Register ``target`` in ``TARGETS`` under ``target.name``; a taken name raises ``DuplicateNameError``.

    ``source`` (recorded in the registry and named in duplicate errors) defaults to the calling module.
    """
    if not isinstance(target, LatencyTarget):
        raise LatencyError(f"register_target takes a LatencyTarget, got {type(target).__name__}")
    if source is None:
        caller = inspect.currentframe()
        caller = caller.f_back if caller is not None else None
        source = caller.f_globals.get("__name__", "<unknown>") if caller is not None else "<unknown>"
    return TARGETS.register(target.name, target, source=source, **metadata)


register_target(LatencyTarget("cpu_fp32", CPU_PROVIDER, "fp32"), source=__name__, description="ONNX Runtime CPU, fp32 model")
register_target(LatencyTarget("cpu_int8", CPU_PROVIDER, "int8"), source=__name__, description="ONNX Runtime CPU, static QDQ INT8 model")
register_target(LatencyTarget("cuda_fp32", CUDA_PROVIDER, "fp32"), source=__name__, description="ONNX Runtime CUDA, fp32 model")
register_target(LatencyTarget("tensorrt_fp16", TENSORRT_PROVIDER, "fp16"), source=__name__, description="ONNX Runtime TensorRT, fp16 engine of the fp32 model")


def get_target(name: str) -> LatencyTarget:
    """The registered target ``name`` as registered (no check that this machine can run it).

    Raises:
        LatencyError: an unknown name, with the registered names and a "did you mean".
    """
    problem = TARGETS.problem(name)
    if problem is not None:
        raise LatencyError(f"latency target {problem}")
    return TARGETS.get(name)


def available_targets() -> list[str]:
    """Names of the registered targets whose provider this onnxruntime offers (``get_available_providers()``)."""
    providers = set(onnxruntime_module().get_available_providers())
    return [name for name, target in TARGETS.items() if target.provider in providers]


def resolve_target(name: str, threads: int | None = None, batch_size: int | None = None) -> LatencyTarget:
    """The registered target ``name``, with ``threads`` and ``batch_size`` when given (else the registered ones),
    checked to run on this machine.

    Raises:
        LatencyError: an unknown name (with a "did you mean"), a bad ``threads`` / ``batch_size``, or a target
            whose provider this onnxruntime lacks.
    """
    target = get_target(name)
    target = replace(
        target,
        name=name,
        threads=target.threads if threads is None else threads,
        batch_size=target.batch_size if batch_size is None else batch_size,
    )
    onnxruntime = onnxruntime_module()
    providers = onnxruntime.get_available_providers()
    if target.provider not in providers:
        raise LatencyError(
            f"latency target {name!r} needs {target.provider}, which this onnxruntime "
            f"{onnxruntime.__version__} does not provide (providers: {providers}); "
            f"available targets: {available_targets()}"
        )
    return target


__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "PRECISIONS",
    "TARGETS",
    "TENSORRT_PROVIDER",
    "LatencyError",
    "LatencyTarget",
    "available_targets",
    "get_target",
    "onnxruntime_module",
    "register_target",
    "resolve_target",
]
