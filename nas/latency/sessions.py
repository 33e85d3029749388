"""ONNX Runtime sessions for measuring: model sources, session options, creation on the target's provider (no
silent CPU fallback), the model's fixed input, and the quantization record of nasforge INT8 files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nas.latency.targets import LatencyError, LatencyTarget, onnxruntime_module

ModelSource = str | Path | bytes
"""An ONNX model: a file path or the serialized ``ModelProto`` bytes."""

NUMPY_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
"""ONNX Runtime input type -> the numpy dtype of the input drawn for it."""


def load_proto(model: ModelSource) -> Any:
    """The ``onnx.ModelProto`` of ``model`` without external data."""
    import onnx

    if isinstance(model, bytes):
        return onnx.load_model_from_string(model)
    return onnx.load(str(model), load_external_data=False)


def check_source(model: ModelSource, what: str) -> ModelSource:
    """``model`` as bytes or an existing file path; raises ``LatencyError`` naming ``what`` otherwise."""
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


def session_options(target: LatencyTarget) -> Any:
    """``SessionOptions``: ``target.threads`` intra-op threads, one inter-op thread, sequential, all optimisations."""
    onnxruntime = onnxruntime_module()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = target.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def create_session(model: ModelSource, target: LatencyTarget, options: Any, what: str) -> Any:
    """An ``InferenceSession`` of ``model`` on ``target``'s provider (checked: no silent CPU fallback)."""
    onnxruntime = onnxruntime_module()
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = onnxruntime.InferenceSession(source, options, providers=target.providers())
    except Exception as error:
        raise LatencyError(f"{what}: ONNX Runtime cannot load it on {target.provider}: {error}") from error
    active = session.get_providers()
    if not active or active[0] != target.provider:
        raise LatencyError(
            f"{what}: the session runs on {active} instead of {target.provider} (the provider failed to initialise; check the CUDA / TensorRT libraries)"
        )
    return session


def vocabulary_size(model: ModelSource, input_name: str) -> int | None:
    """Rows of the embedding table that the token input indexes (a ``Gather`` of an initializer), if any."""
    proto = load_proto(model)
    initializers = {tensor.name: list(tensor.dims) for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == input_name:
            shape = initializers.get(node.input[0])
            if shape:
                return int(shape[0])
    return None


def model_input(
    session: Any,
    model: ModelSource,
    target: LatencyTarget,
    *,
    input_shape: Sequence[int] | None,
    vocab_size: int | None,
    seed: int,
    what: str,
) -> tuple[str, np.ndarray]:
    """``(input name, array)``: the fixed input ``[B, ...]`` of ``target.batch_size`` for ``session``.

    Float inputs are drawn from a standard normal, token ids uniformly from ``[0, vocab_size)`` (default: the rows
    of the embedding table the input indexes), both by ``numpy.random.default_rng(seed)``.
    """
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise LatencyError(f"{what}: latency models take exactly one input, this one takes {[i.name for i in inputs]}")
    metadata = inputs[0]
    dtype = NUMPY_DTYPES.get(metadata.type)
    if dtype is None:
        raise LatencyError(f"{what}: input {metadata.name!r} has type {metadata.type}; supported: {list(NUMPY_DTYPES)}")
    declared = list(metadata.shape)
    if not declared:
        raise LatencyError(f"{what}: input {metadata.name!r} is a scalar; expected [B, ...]")
    if isinstance(declared[0], int) and declared[0] != target.batch_size:
        raise LatencyError(f"{what}: the model's batch axis is fixed to {declared[0]}, the target's batch_size is {target.batch_size}")
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
            raise LatencyError(f"{what}: input {metadata.name!r} {declared} has symbolic sizes {symbolic} besides the batch axis; pass input_shape")
        shape = [int(size) for size in declared[1:]]
    full_shape = (target.batch_size, *shape)
    generator = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return metadata.name, generator.standard_normal(full_shape).astype(dtype)
    vocabulary = vocab_size if vocab_size is not None else vocabulary_size(model, metadata.name)
    if vocabulary is None or vocabulary < 1:
        raise LatencyError(
            f"{what}: cannot tell the vocabulary size of the token input {metadata.name!r} (no embedding Gather of an initializer); pass vocab_size"
        )
    return metadata.name, generator.integers(0, vocabulary, size=full_shape, dtype=dtype)


def quantization_metadata(session: Any, target: LatencyTarget, what: str) -> dict[str, Any] | None:
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


__all__ = [
    "NUMPY_DTYPES",
    "ModelSource",
    "check_source",
    "create_session",
    "load_proto",
    "model_input",
    "quantization_metadata",
    "session_options",
    "vocabulary_size",
]
