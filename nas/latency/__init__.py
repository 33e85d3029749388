"""Latency measured through ONNX Runtime, one concern per module:

- ``targets``: ``LatencyTarget`` and ``TARGETS``, the registry of target names (``register_target`` for a user's own);
- ``fingerprint``: the device fingerprint (CPU model and flags, GPU, ONNX Runtime, provider, ...) and its key;
- ``sessions``: ONNX Runtime sessions on a target's provider and the model's fixed input;
- ``protocol``: ``measure_latency``, the interleaved measurement of several models, and ``Measurement``;
- ``op_profile``: time per op kind from ONNX Runtime's profiler, fp32 against INT8.

The names below are the public API; every module imports onnxruntime only when it measures.
"""

from nas.latency.fingerprint import (
    FINGERPRINT_KEY_FIELDS,
    INFERENCE_CPU_FLAGS,
    INT8_DOT_PRODUCT_FLAGS,
    device_fingerprint,
    fingerprint_differences,
    fingerprint_key,
    gpu_name,
    int8_dot_product_flags,
)
from nas.latency.op_profile import QUANTIZE_KIND, OpTypeComparison, compare_op_types, float_op_kind, op_type_profile
from nas.latency.protocol import DEFAULT_MIN_SECONDS, Measurement, is_stable, measure_latency, robust_cv
from nas.latency.targets import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TARGETS,
    TENSORRT_PROVIDER,
    LatencyError,
    LatencyTarget,
    available_targets,
    get_target,
    register_target,
    resolve_target,
)

__all__ = [
    "CPU_PROVIDER",
    "CUDA_PROVIDER",
    "DEFAULT_MIN_SECONDS",
    "FINGERPRINT_KEY_FIELDS",
    "INFERENCE_CPU_FLAGS",
    "INT8_DOT_PRODUCT_FLAGS",
    "QUANTIZE_KIND",
    "TARGETS",
    "TENSORRT_PROVIDER",
    "LatencyError",
    "LatencyTarget",
    "Measurement",
    "OpTypeComparison",
    "available_targets",
    "compare_op_types",
    "device_fingerprint",
    "fingerprint_differences",
    "fingerprint_key",
    "float_op_kind",
    "get_target",
    "gpu_name",
    "int8_dot_product_flags",
    "is_stable",
    "measure_latency",
    "op_type_profile",
    "register_target",
    "resolve_target",
    "robust_cv",
]
