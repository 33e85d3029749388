"""The device fingerprint: where and how a latency was measured (CPU model and flags, GPU, ONNX Runtime version and
provider, precision, threads, input, quantization format), stored with every measurement.

``fingerprint_key`` hashes the fields that change latency, for keying caches; ``fingerprint_differences`` compares
two fingerprints on exactly those fields, so that a figure (or a predictor fitted on figures) from one device is
never silently used for another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nas import jsonio
from nas.latency.targets import CPU_PROVIDER, LatencyError, LatencyTarget, onnxruntime_module

logger = logging.getLogger(__name__)

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

INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
"""CPU flags of 8-bit dot-product instructions, which make INT8 matrix products fast: x86 AVX512-VNNI, AVX-VNNI
and AMX-INT8; Arm SDOT/UDOT (``asimddp``) and I8MM."""

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

REQUIRED_FINGERPRINT_FIELDS = ("cpu_model", "onnxruntime_version", "provider", "precision", "threads", "batch_size")
"""Fields without which a fingerprint cannot say where a figure comes from."""

QUANTIZATION_LATENCY_FIELDS = ("format", "activation_type", "weight_type", "per_channel", "reduce_range")
"""Fields of the ``quantization`` record that change latency (calibration details do not)."""


@functools.cache
def cpu_description() -> tuple[str, tuple[str, ...]]:
    """``(model name, inference-relevant flags)`` of this CPU, from ``/proc/cpuinfo``."""
    model, flags = "", set[str]()
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
    """Where and how a figure is measured (JSON-safe); stored with every ``Measurement``.

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
    cpu_model, cpu_flags = cpu_description()
    return {
        "cpu_model": cpu_model,
        "cpu_flags": list(cpu_flags),
        "logical_cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "gpu": gpu_name(),
        "onnxruntime_version": onnxruntime_module().__version__,
        "target": target.name,
        "provider": target.provider,
        "precision": target.precision,
        "threads": target.threads,
        "batch_size": target.batch_size,
        "input_shape": None if input_shape is None else [int(size) for size in input_shape],
        "input_dtype": input_dtype,
        "quantization": None if quantization is None else dict(quantization),
    }


def keyed_fields(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``fingerprint`` that affect latency, as :func:`fingerprint_key` hashes them: every
    ``FINGERPRINT_KEY_FIELDS`` entry (absent ones as ``None``; of ``quantization`` only
    ``QUANTIZATION_LATENCY_FIELDS``) and, for GPU providers, ``gpu``.

    Raises:
        LatencyError: ``fingerprint`` is not a mapping or lacks one of ``REQUIRED_FINGERPRINT_FIELDS``.
    """
    if not isinstance(fingerprint, Mapping):
        raise LatencyError(f"a fingerprint must be a mapping (see device_fingerprint), got {type(fingerprint).__name__}")
    missing = [name for name in REQUIRED_FINGERPRINT_FIELDS if name not in fingerprint]
    if missing:
        raise LatencyError(f"fingerprint lacks the field(s) {missing} (has {sorted(fingerprint)})")
    keyed: dict[str, Any] = {name: fingerprint.get(name) for name in FINGERPRINT_KEY_FIELDS}
    if isinstance(keyed["quantization"], Mapping):
        keyed["quantization"] = {name: keyed["quantization"][name] for name in QUANTIZATION_LATENCY_FIELDS if name in keyed["quantization"]}
    if fingerprint["provider"] != CPU_PROVIDER:
        keyed["gpu"] = fingerprint.get("gpu")
    return json.loads(jsonio.dumps(keyed, default=str))


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash (16 hex digits) of the fingerprint fields that affect latency, for keying caches.

    Hashed: :func:`keyed_fields`. Not hashed: the target's name, and the GPU name on the CPU provider.

    Raises:
        LatencyError: a required field (``cpu_model``, ``onnxruntime_version``, ``provider``, ``precision``,
            ``threads``, ``batch_size``) is missing.
    """
    text = jsonio.dumps(keyed_fields(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_differences(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Field -> ``(expected value, actual value)`` for every field that :func:`fingerprint_key` hashes and the two
    fingerprints disagree on; empty when their keys are equal. ``cpu_flags`` compare as sets."""
    wanted, given = keyed_fields(expected), keyed_fields(actual)
    differences: dict[str, tuple[Any, Any]] = {}
    for name in dict.fromkeys([*wanted, *given]):
        left, right = wanted.get(name), given.get(name)
        if name == "cpu_flags" and isinstance(left, list) and isinstance(right, list):
            same = set(left) == set(right)
        else:
            same = left == right
        if not same:
            differences[name] = (left, right)
    return differences


def describe_differences(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``"cpu_model 'A' vs 'B', threads 1 vs 4"``: one phrase per differing field (expected value first)."""
    return ", ".join(f"{name} {left!r} vs {right!r}" for name, (left, right) in differences.items())


def int8_dot_product_flags(cpu_flags: Iterable[str]) -> list[str]:
    """Those of ``cpu_flags`` that are 8-bit dot-product instructions (``INT8_DOT_PRODUCT_FLAGS``), in that order."""
    present = set(cpu_flags)
    return [flag for flag in INT8_DOT_PRODUCT_FLAGS if flag in present]


__all__ = [
    "FINGERPRINT_KEY_FIELDS",
    "INFERENCE_CPU_FLAGS",
    "INT8_DOT_PRODUCT_FLAGS",
    "QUANTIZATION_LATENCY_FIELDS",
    "REQUIRED_FINGERPRINT_FIELDS",
    "cpu_description",
    "describe_differences",
    "device_fingerprint",
    "fingerprint_differences",
    "fingerprint_key",
    "gpu_name",
    "int8_dot_product_flags",
    "keyed_fields",
]
