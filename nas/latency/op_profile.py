"""Op-type profiles: where a model's time goes, per kind of op, from ONNX Runtime's profiler; fp32 against INT8."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas.latency.sessions import ModelSource, check_source, create_session, model_input, quantization_metadata, session_options
from nas.latency.targets import LatencyError, LatencyTarget

logger = logging.getLogger(__name__)

QUANTIZE_KIND = "Quantize/Dequantize"
DEPTHWISE_CONV_KIND = "Conv (depthwise)"
DENSE_CONV_KIND = "Conv (dense)"


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
    little) runs ``warmup`` then ``runs`` times on the same kind of input as
    ``nas.latency.protocol.measure_latency``; only the node events (``"cat": "Node"``,
    ``"<node name>_kernel_time"``) that fall inside the last ``runs`` ``model_run`` events are counted. The
    optimized graph is saved next to the trace so that each event's node is looked up by name: convolutions become
    ``"Conv (depthwise)"`` (``group`` > 1 and one input channel per group, i.e. ``group`` equals the input
    channels) or ``"Conv (dense)"``; other ops map to the float op they implement (:func:`float_op_kind`:
    ``QLinearConv`` -> Conv, ``MatMulIntegerToFloat`` -> ``MatMul``, ``QGemm`` -> ``Gemm``, ``QuantizeLinear`` /
    ``DequantizeLinear`` -> ``"Quantize/Dequantize"``, ...). Fused nodes count under their main op (ORT's NCHWc
    ``Conv`` with a fused activation is all ``Conv``). The trace and the graph are written to a temporary folder
    that is removed afterwards.

    Args:
        model: ONNX file path or serialized model (``*.int8.onnx`` for INT8 targets).
        target: provider, precision, threads and batch size.
        runs: profiled runs averaged over.
        warmup: runs before them, not counted.
        seed, input_shape, vocab_size: as for ``nas.latency.protocol.measure_latency``.

    Returns:
        kind -> mean microseconds per run, largest first.
    """
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LatencyError(f"{name} must be an integer >= {low}, got {value!r}")
    source = check_source(model, "profiled model")
    with tempfile.TemporaryDirectory(prefix="nasforge-profile-") as scratch:
        options = session_options(target)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        optimized = Path(scratch) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        session = create_session(source, target, options, "profiled model")
        try:
            quantization_metadata(session, target, "profiled model")
            input_name, array = model_input(
                session,
                source,
                target,
                input_shape=input_shape,
                vocab_size=vocab_size,
                seed=seed,
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
    "DENSE_CONV_KIND",
    "DEPTHWISE_CONV_KIND",
    "QUANTIZE_KIND",
    "OpTypeComparison",
    "compare_op_types",
    "float_op_kind",
    "op_type_profile",
]
