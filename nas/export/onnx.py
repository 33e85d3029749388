"""Export static subnets to ONNX (fp32, optionally INT8) and check them against PyTorch.

A file only appears under its final name once every check passed: it is written under a temporary name in the
same folder, checked (``onnx.checker`` with ``full_check``, then ONNX Runtime against PyTorch or against the fp32
model) and atomically renamed; a failed check deletes it and raises :class:`ExportError`.

Graph contract of every exported model:

* input ``"input"``: images float32 ``[B, C, R, R]``, sequences int64 token ids ``[B, L]`` (``R`` / ``L`` fixed
  by the arch, ``B`` dynamic);
* output ``"logits"``: images ``[B, num_classes]``, sequences ``[B, L, num_classes]``;
* ``metadata_props``: ``nasforge_arch`` (``Arch.to_json()``), ``nasforge_space``, ``nasforge_version``,
  ``nasforge_input_shape`` (JSON list, ``"batch"`` for the dynamic axis), ``nasforge_input_dtype``, and for INT8
  models ``nasforge_quantization`` (JSON: format, types, per-channel, reduce_range, calibration size).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas import __version__, jsonio
from nas.data.splits import Split
from nas.supernets.space import Arch, ArchError, SearchSpace

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MODEL_STEM = "model"

MIN_INT8_AGREEMENT = 0.9
"""The smallest top-1 agreement of an INT8 model with its fp32 model (on the validation inputs) for the INT8 model to
be written. The search applies the same rule: a trial whose INT8 model falls below it has no INT8 model, so it is on
no INT8 front."""

QUANTIZED_OP_TYPES = ("Conv", "Gemm", "MatMul")
"""Op types that INT8 quantization may touch (MatMul only with a weight initializer as its second input)."""

_INSTALL_HINT = "pip install 'onnxruntime>=1.18' 'onnx>=1.16'"


class ExportError(RuntimeError):
    """An export check failed; the message says which check and by how much."""


@dataclass(frozen=True, slots=True)
class ExportResult:
    """What an export wrote and how closely it matches its reference.

    Attributes:
        path: the fp32 ONNX file.
        max_abs_error: max ``|ORT - PyTorch|`` over the logits of the check batch.
        int8_path: the INT8 ONNX file, when one was written.
        int8_top1_agreement: fraction of predictions (every position for sequences) where the INT8 argmax equals
            the fp32 argmax on the validation inputs.
        int8_max_abs_error: max ``|INT8 - fp32|`` over the logits of the validation inputs.
    """

    path: Path
    max_abs_error: float
    int8_path: Path | None = None
    int8_top1_agreement: float | None = None
    int8_max_abs_error: float | None = None


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"ONNX export checks need onnxruntime: {_INSTALL_HINT}") from error
    return onnxruntime


def _session(path: Path) -> Any:
    """A single-threaded CPU ONNX Runtime session for ``path``."""
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits of ``inputs`` ([N, ...]) in batches of ``batch_size``, concatenated along axis 0."""
    outputs = [session.run([OUTPUT_NAME], {INPUT_NAME: inputs[start : start + batch_size]})[0] for start in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs, axis=0)


def _check_input(tensor: torch.Tensor, arch: Arch, name: str) -> None:
    """Raise ``ExportError`` unless ``tensor`` is a batch of inputs of ``arch``."""
    if arch.resolution is not None:
        expected = f"a float32 tensor [B, C, {arch.resolution}, {arch.resolution}]"
        ok = tensor.dtype == torch.float32 and tensor.dim() == 4 and tensor.shape[-2:] == (arch.resolution, arch.resolution)
    elif arch.sequence_length is not None:
        expected = f"an int64 tensor [B, {arch.sequence_length}]"
        ok = tensor.dtype == torch.int64 and tensor.dim() == 2 and tensor.shape[1] == arch.sequence_length
    else:
        raise ExportError("arch has neither a resolution nor a sequence_length")
    if not ok or tensor.shape[0] < 1:
        raise ExportError(f"{name} must be {expected} with B >= 1, got {tensor.dtype} {list(tensor.shape)}")


def _check_batch(example: torch.Tensor, check_inputs: torch.Tensor) -> torch.Tensor:
    """``check_inputs`` with a batch size different from ``example``'s (its first row appended if needed)."""
    if check_inputs.shape[0] != example.shape[0]:
        return check_inputs
    return torch.cat([check_inputs, check_inputs[:1]])


def _max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise ExportError(f"output shape {list(actual.shape)} differs from the reference {list(expected.shape)}")
    if not np.isfinite(actual).all() or not np.isfinite(expected).all():
        return float("inf")
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))


@contextlib.contextmanager
def _temporary_sibling(path: Path) -> Iterator[Path]:
    """A fresh temporary file name next to ``path`` (same folder, so ``os.replace`` is atomic); removed on exit
    unless it was renamed away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def _set_metadata(model: Any, values: dict[str, str]) -> None:
    """Set ``metadata_props`` of an ``onnx.ModelProto``, replacing existing keys."""
    kept = [(prop.key, prop.value) for prop in model.metadata_props if prop.key not in values]
    del model.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _check_model(path: Path, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"{what} failed onnx.checker: {error}") from error


def float64_distances(model: nn.Module, inputs: torch.Tensor, actual: np.ndarray) -> tuple[float, float]:
    """``(max |actual - exact|, max |model(inputs) - exact|)`` where ``exact`` is the model run in float64: how far
    ONNX Runtime's output ``actual`` and float32 PyTorch's are from the value both approximate."""
    import copy

    reference = copy.deepcopy(model).double().eval()
    floating = inputs.double() if inputs.is_floating_point() else inputs
    with torch.no_grad():
        exact = reference(floating).numpy()
        mine = model(inputs).double().numpy()
    return float(np.abs(actual.astype(np.float64) - exact).max(initial=0.0)), float(np.abs(mine - exact).max(initial=0.0))


def matches_within_rounding(model: nn.Module, inputs: torch.Tensor, actual: np.ndarray, tolerance: float) -> tuple[bool, float, float]:
    """Whether ONNX Runtime's output ``actual`` agrees with ``model`` on ``inputs``: within ``tolerance`` of float32
    PyTorch, or, where PyTorch's own float32 rounding is larger, no further from the float64 value than twice
    PyTorch's distance to it (the two runtimes sum in different orders; a deep recurrence such as the delta rule's
    unrolled forward substitution can put them about two rounding errors apart in opposite directions). Returns
    ``(ok, max |ORT - float64|, max |PyTorch float32 - float64|)``."""
    with torch.no_grad():
        expected = model(inputs).numpy()
    if _max_abs_error(actual, expected) <= tolerance:
        return True, float("nan"), float("nan")
    distance, noise = float64_distances(model, inputs, actual)
    return distance <= max(tolerance, 2 * noise), distance, noise


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    arch: Arch,
    space_name: str,
    check_inputs: torch.Tensor | None = None,
    tolerance: float = 1e-4,
    opset: int = 17,
) -> ExportResult:
    """Export a static subnet to ONNX at ``path`` and check it against PyTorch.

    Args:
        model: the static subnet (exported in eval mode; its training flag is restored afterwards).
        example: tracing input, images float32 ``[B, C, R, R]`` or sequences int64 ``[B, L]`` with ``R`` / ``L`` of
            ``arch``. Use ``B >= 2``.
        path: destination; its folder is created. Written atomically: it appears only once every check passed.
        arch: stored as ``nasforge_arch`` metadata; also fixes the expected input size.
        space_name: stored as ``nasforge_space`` metadata.
        check_inputs: inputs (shaped like ``example``) compared between ONNX Runtime and PyTorch; default
            ``example``. Run with a batch size different from ``example``'s (the first row is appended when the
            sizes agree) so that a batch size baked into the graph is caught.
        tolerance: largest allowed max ``|ORT - PyTorch|`` over the logits. When the model's own float32 rounding
            is larger (gated linear attention's recurrences at initialisation can reach 2e-4), ONNX Runtime may be
            up to twice as far from the float64 value as float32 PyTorch is (``matches_within_rounding``), and the
            log says so. A tolerance <= 0 disables this allowance.
        opset: ONNX opset. The TorchScript exporter (``dynamo=False``) is deliberate: static subnets run the
            plain-PyTorch reference kernels, trace to small standard-op graphs, and get a dynamic batch axis from
            ``dynamic_axes``; its deprecation warning is silenced here.

    Returns:
        ``ExportResult`` with ``path`` and ``max_abs_error``.

    Raises:
        ExportError: bad inputs, ``onnx.checker`` failure, or an error above ``tolerance`` (no file is left).
    """
    import onnx

    path = Path(path)
    _check_input(example, arch, "example")
    check_inputs = example if check_inputs is None else check_inputs
    _check_input(check_inputs, arch, "check_inputs")
    if check_inputs.shape[1:] != example.shape[1:]:
        raise ExportError(f"check_inputs must match the example's shape after the batch axis {list(example.shape[1:])}, got {list(check_inputs.shape[1:])}")
    check_inputs = _check_batch(example, check_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(check_inputs).numpy()
        with _temporary_sibling(path) as temporary:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
                # Slices with a step (the causal short convolution, chunked GLA) are not folded; nothing is lost.
                warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
                # Only the batch axis is dynamic: a sequence length or a chunk count read as a Python number while
                # tracing (the chunkwise kernels) is meant to be a constant of the graph. A batch size baked in by
                # mistake would not hide: the check below runs a batch of another size.
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                torch.onnx.export(
                    model,
                    (example,),
                    str(temporary),
                    dynamo=False,
                    export_params=True,
                    opset_version=opset,
                    do_constant_folding=True,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
            proto = onnx.load(str(temporary))
            _set_metadata(
                proto,
                {
                    "nasforge_arch": arch.to_json(),
                    "nasforge_space": space_name,
                    "nasforge_version": __version__,
                    "nasforge_input_shape": jsonio.dumps(["batch", *example.shape[1:]]),
                    "nasforge_input_dtype": str(example.dtype).removeprefix("torch."),
                },
            )
            onnx.save(proto, str(temporary))
            _check_model(temporary, f"ONNX export of {arch.short_name()}")
            session = _session(temporary)
            actual = _run(session, check_inputs.numpy(), len(check_inputs))
            del session
            error = _max_abs_error(actual, expected)
            within, beyond = error <= tolerance, ""
            if 0 < tolerance < error:
                within, distance, noise = matches_within_rounding(model, check_inputs, actual, tolerance)
                logger.info(
                    "max |ORT - PyTorch| %.3g exceeds %.3g; ORT is %.3g from the float64 value, float32 PyTorch %.3g",
                    error,
                    tolerance,
                    distance,
                    noise,
                )
                beyond = f", and {distance:.3g} from the float64 value, above twice float32 PyTorch's {noise:.3g}"
            logger.info(
                "exported %s to %s: max |ORT - PyTorch| = %.3g on a batch of %d (tolerance %.3g)",
                arch.short_name(),
                path,
                error,
                len(check_inputs),
                tolerance,
            )
            if not within:
                raise ExportError(
                    f"ONNX Runtime output differs from PyTorch by max abs error {error:.3g} on a batch of "
                    f"{len(check_inputs)}, above the tolerance {tolerance:.3g}{beyond} ({path} not written)"
                )
            os.replace(temporary, path)
    finally:
        model.train(was_training)
    return ExportResult(path=path, max_abs_error=error)


def onnx_accuracy(path: Path, arch: Arch, split: Split, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of the ONNX model at ``path`` on ``split``: the inputs prepared for ``arch`` as everywhere in
    nasforge (``prepare_batch``: images resized to its resolution, sequences cut to its length), run by ONNX Runtime
    on the CPU (one thread) in batches of ``batch_size``. This is the accuracy every table reports for a model that
    ships: the search scores the very file the export writes, the export scores what it wrote."""
    from nas.training.evaluation import correct_and_total, prepare_batch

    session = _session(Path(path))
    correct = total = 0
    for start in range(0, int(split.targets.shape[0]), batch_size):
        inputs, targets = prepare_batch(split.inputs[start : start + batch_size], split.targets[start : start + batch_size], arch)
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(inputs.numpy())})[0]
        hits, count = correct_and_total(torch.from_numpy(logits), targets)
        correct += hits
        total += count
    return correct / max(total, 1)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path`` (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def read_arch(path: Path, space: SearchSpace | None = None) -> Arch:
    """The arch an exported ONNX file stores as ``nasforge_arch`` metadata, read back through the one arch validation
    (``Arch.from_json``; with ``space`` also checked against it); raises ``ArchError`` listing every problem."""
    from google.protobuf.message import DecodeError

    try:
        metadata = read_metadata(path)
    except (OSError, ValueError, DecodeError) as error:
        raise ArchError(f"not a readable ONNX model ({error})", str(path)) from None
    if "nasforge_arch" not in metadata:
        raise ArchError("has no 'nasforge_arch' metadata; it is not a model that nasforge exported", str(path))
    return Arch.from_json(metadata["nasforge_arch"], space, source=f"{path} (nasforge_arch metadata)")


def quantizable_nodes(model: Any) -> tuple[list[str], list[str]]:
    """Split the nodes of an ``onnx.ModelProto`` into those INT8 may quantize and all others.

    Quantized: ``Conv``, ``Gemm``, and ``MatMul`` whose second input is a weight initializer (projection and
    feed-forward layers). Everything else is excluded, in particular activation x activation ``MatMul`` (softmax
    attention scores and weighted values, gated linear attention), ``Softmax``, ``LayerNormalization``,
    ``Sigmoid``. Every node must have a unique name (see ``_name_nodes``).

    Returns:
        ``(to_quantize, to_exclude)``, node names.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    to_quantize, to_exclude = [], []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") or (node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in initializers):
            to_quantize.append(node.name)
        else:
            to_exclude.append(node.name)
    return to_quantize, to_exclude


def _name_nodes(model: Any) -> None:
    """Give every node of the main graph a unique, non-empty name (quantizer node lists go by name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_nasforge_{index}"
        seen.add(node.name)


class _BatchReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over ``[N, ...]`` calibration inputs in batches."""

    def __init__(self, inputs: np.ndarray, batch_size: int) -> None:
        self.inputs = inputs
        self.batch_size = batch_size
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.inputs):
            return None
        batch = self.inputs[self.start : self.start + self.batch_size]
        self.start += self.batch_size
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.start = 0


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has an 8-bit dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _preprocess(source: Path, destination: Path) -> Path:
    """``quant_pre_process`` (shape inference + ORT basic optimisation) of ``source`` into ``destination``.

    Falls back to ONNX shape inference only (ORT's symbolic shape inference rejects some Reshape patterns of the
    sequence blocks), then to ``source`` itself, logging why.
    """
    from onnxruntime.quantization import quant_pre_process

    for skip_symbolic_shape in (False, True):
        try:
            quant_pre_process(str(source), str(destination), skip_symbolic_shape=skip_symbolic_shape)
            return destination
        except Exception as error:  # noqa: BLE001 - third-party shape inference raises anything
            logger.info(
                "quant_pre_process (skip_symbolic_shape=%s) failed: %s: %s",
                skip_symbolic_shape,
                type(error).__name__,
                error,
            )
    logger.warning("quantizing %s without pre-processing (shape inference failed)", source)
    return source


def _as_input_array(tensor: torch.Tensor, name: str) -> np.ndarray:
    if tensor.dim() < 2 or len(tensor) == 0:
        raise ExportError(f"{name} must be a non-empty batch [N, ...], got shape {list(tensor.shape)}")
    if tensor.dtype not in (torch.float32, torch.int64):
        raise ExportError(f"{name} must be float32 (images) or int64 (token ids), got {tensor.dtype}")
    return np.ascontiguousarray(tensor.detach().cpu().numpy())


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    *,
    calibration: torch.Tensor,
    validation: torch.Tensor,
    min_agreement: float | None = None,
    batch_size: int = 32,
    reduce_range: bool | None = None,
) -> ExportResult:
    """Static INT8 quantization of an exported fp32 model, checked against it.

    Format, following the ``quantize_static`` guidance of ONNX Runtime for CPU inference: QDQ (the format ORT's CPU
    kernels are optimised for since 1.11), per-channel weights, activations ``QUInt8`` and weights ``QInt8``
    (U8S8: x86 integer kernels multiply unsigned by signed bytes, ``VPMADDUBSW`` / VNNI ``VPDPBUSD``).
    ``reduce_range`` (7-bit weights) defaults to ``True`` on CPUs without VNNI, where ``VPMADDUBSW`` can saturate
    its 16-bit sums, and to ``False`` with VNNI; the choice is recorded in ``nasforge_quantization``. (For ARM CPUs
    ORT suggests ``QInt8`` activations; these files target x86 CPU profiles.)
    Calibration: MinMax over ``calibration`` (training inputs) in batches of ``batch_size``, after
    ``quant_pre_process``.

    Only nodes that keep accuracy are quantized (see ``quantizable_nodes``): ``Conv``, ``Gemm`` and ``MatMul`` with
    a weight initializer as second input; every other node is passed explicitly as excluded. Outputs of
    ``MatMul`` / ``Gemm`` stay float (their consumers, bias adds, attention, norms, are float; ORT runs such
    a QDQ MatMul as ``MatMulIntegerToFloat``), so the inputs of attention matmuls are never dequantized tensors.

    Args:
        fp32_path: the model written by ``export_onnx``.
        int8_path: destination, written atomically after the checks.
        calibration: inputs ``[N, ...]`` (float32 images or int64 tokens) used to calibrate activation ranges.
        validation: inputs ``[M, ...]`` on which INT8 and fp32 predictions are compared.
        min_agreement: smallest allowed top-1 agreement (over every position for sequence outputs
            ``[B, L, V]``); default ``MIN_INT8_AGREEMENT``.
        batch_size: batch size for calibration and validation runs.
        reduce_range: 7-bit weights; ``None`` decides from this CPU (see above).

    Returns:
        ``ExportResult`` with ``path = fp32_path``, ``max_abs_error = nan`` (the fp32 check is ``export_onnx``'s)
        and the INT8 fields.

    Raises:
        ExportError: ``onnx.checker`` failure or agreement below ``min_agreement`` (no file is left).
    """
    import onnx

    _onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    min_agreement = MIN_INT8_AGREEMENT if min_agreement is None else min_agreement
    if batch_size < 1:
        raise ExportError(f"batch_size must be at least 1, got {batch_size}")
    calibration_inputs = _as_input_array(calibration, "calibration")
    validation_inputs = _as_input_array(validation, "validation")
    if reduce_range is None:
        reduce_range = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and not cpu_has_vnni()
    settings = {
        "format": "QDQ",
        "activation_type": "uint8",
        "weight_type": "int8",
        "per_channel": True,
        "reduce_range": reduce_range,
        "calibration": "MinMax",
        "calibration_samples": len(calibration_inputs),
        "op_types": list(QUANTIZED_OP_TYPES),
    }
    with tempfile.TemporaryDirectory(prefix="nasforge-int8-") as scratch, _temporary_sibling(int8_path) as temporary:
        prepared = _preprocess(fp32_path, Path(scratch) / "preprocessed.onnx")
        model = onnx.load(str(prepared))
        _name_nodes(model)
        named = Path(scratch) / "named.onnx"
        onnx.save(model, str(named))
        to_quantize, to_exclude = quantizable_nodes(model)
        logger.info("INT8: quantizing %d of %d nodes of %s", len(to_quantize), len(model.graph.node), fp32_path)
        quantize_static(
            str(named),
            str(temporary),
            _BatchReader(calibration_inputs, batch_size),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=to_quantize,
            nodes_to_exclude=to_exclude,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
        )
        quantized = onnx.load(str(temporary))
        metadata = read_metadata(fp32_path)
        metadata["nasforge_quantization"] = jsonio.dumps(settings, sort_keys=True)
        _set_metadata(quantized, metadata)
        onnx.save(quantized, str(temporary))
        _check_model(temporary, f"INT8 model of {fp32_path.name}")
        reference = _run(_session(fp32_path), validation_inputs, batch_size)
        actual = _run(_session(temporary), validation_inputs, batch_size)
        error = _max_abs_error(actual, reference)
        agreement = float((actual.argmax(-1) == reference.argmax(-1)).mean())
        logger.info(
            "INT8 %s: top-1 agreement with fp32 %.4f on %d inputs, max |INT8 - fp32| = %.3g",
            int8_path,
            agreement,
            len(validation_inputs),
            error,
        )
        if not agreement >= min_agreement:
            raise ExportError(
                f"INT8 top-1 agreement with fp32 is {agreement:.4f} on {len(validation_inputs)} validation inputs, "
                f"below the required {min_agreement:.4f} ({int8_path} not written)"
            )
        os.replace(temporary, int8_path)
    return ExportResult(
        path=fp32_path,
        max_abs_error=float("nan"),
        int8_path=int8_path,
        int8_top1_agreement=agreement,
        int8_max_abs_error=error,
    )


def export_subnet(
    model: nn.Module,
    arch: Arch,
    space_name: str,
    out_dir: Path,
    *,
    calibration: torch.Tensor,
    validation: torch.Tensor,
    int8: bool,
) -> ExportResult:
    """Write ``<out_dir>/model.onnx`` (and ``model.int8.onnx`` when ``int8``) for a static subnet.

    Args:
        model: the static subnet (``Supernet.extract``, BN recalibrated).
        arch: its architecture (metadata, input size).
        space_name: name of the search space (metadata).
        out_dir: created if missing.
        calibration: training inputs ``[N, ...]``; the first two rows trace the export, all of them calibrate INT8.
        validation: inputs ``[M, ...]``; up to 16 rows check ORT against PyTorch, all of them check INT8.
        int8: also write the INT8 model.

    Returns:
        ``ExportResult`` with the fp32 fields and, when ``int8``, the INT8 fields.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_input(calibration, arch, "calibration")
    _check_input(validation, arch, "validation")
    result = export_onnx(
        model,
        calibration[:2],
        out_dir / f"{MODEL_STEM}.onnx",
        arch=arch,
        space_name=space_name,
        check_inputs=validation[:16],
    )
    if not int8:
        return result
    quantized = quantize_int8(result.path, out_dir / f"{MODEL_STEM}.int8.onnx", calibration=calibration, validation=validation)
    return ExportResult(
        path=result.path,
        max_abs_error=result.max_abs_error,
        int8_path=quantized.int8_path,
        int8_top1_agreement=quantized.int8_top1_agreement,
        int8_max_abs_error=quantized.int8_max_abs_error,
    )


__all__ = [
    "ExportError",
    "ExportResult",
    "MIN_INT8_AGREEMENT",
    "QUANTIZED_OP_TYPES",
    "cpu_has_vnni",
    "export_onnx",
    "export_subnet",
    "float64_distances",
    "matches_within_rounding",
    "onnx_accuracy",
    "quantizable_nodes",
    "quantize_int8",
    "read_arch",
    "read_metadata",
]
