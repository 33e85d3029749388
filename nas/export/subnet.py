"""Steps that combine training, evaluation and export for the CLI: a trained run's subnet out as ONNX."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from nas import durable, jsonio
from nas.data.splits import Split, TaskData
from nas.data.tasks import load_task_data
from nas.export.onnx import ExportError, ExportResult, export_subnet, onnx_accuracy, quantize_int8
from nas.run_dir import EXPORT_ARCH_FILE, EXPORT_SUMMARY_FILE, EXPORT_WEIGHTS_FILE, RunDir
from nas.run_lock import locks_run_dir
from nas.space.schema import RunConfig
from nas.supernets.registry import did_you_mean
from nas.supernets.space import Arch, ArchError, Problem, SearchSpace
from nas.supernets.supernet import Supernet
from nas.training.evaluation import prepare_batch, recalibrate_batch_norm, run_calibration_batches
from nas.training.loop import RunError, load_run

logger = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 256


def int8_calibration_inputs(train: Split) -> torch.Tensor:
    """The training inputs ``[CALIBRATION_SAMPLES, ...]`` that calibrate INT8 activation ranges (the first two also
    trace the ONNX export): the same for the search's evaluators and the export, so the INT8 model whose latency and
    accuracy the search records is the one the export writes."""
    return train.inputs[:CALIBRATION_SAMPLES]


MAX_ARCH_FILE_BYTES = 1_000_000
ARCH_FILE_KEYS = ("space", "arch")


def parse_arch(text: str, space: SearchSpace) -> Arch:
    """'largest', 'smallest', arch JSON, a .json / .yaml file holding an arch (or an exported ``arch.yaml``: a
    mapping with 'space' and 'arch'), or an exported .onnx model (its ``nasforge_arch`` metadata). Every arch goes
    through the one arch validation (``Arch.from_dict`` with ``space``); raises ``ArchError`` listing every problem
    with its path."""
    if text in ("largest", "smallest"):
        return getattr(space, text)()
    if text.lstrip().startswith("{"):
        return Arch.from_json(text, space, source="--arch")
    path = Path(text)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):
        is_file = False
    if not is_file:
        raise ArchError(f"--arch must be 'largest', 'smallest', arch JSON or an existing file, got {text[:200]!r}")
    if path.suffix == ".onnx":
        from nas.export.onnx import read_arch

        return read_arch(path, space)
    return _arch_from_file(path, space)


def _arch_from_file(path: Path, space: SearchSpace) -> Arch:
    """The arch in a .json (strict JSON) or YAML file, alone or under the 'arch' key of an exported ``arch.yaml``."""
    source = str(path)
    try:
        with path.open("rb") as file:
            content = file.read(MAX_ARCH_FILE_BYTES + 1)
        if len(content) > MAX_ARCH_FILE_BYTES:
            raise ArchError(f"file is larger than {MAX_ARCH_FILE_BYTES:,} bytes; an arch file is short", source)
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ArchError(f"file is not UTF-8 text (byte {error.start})", source) from None
    except OSError as error:
        raise ArchError(f"cannot read the file: {error.strerror or error}", source) from None
    try:
        data = jsonio.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, RecursionError, yaml.YAMLError) as error:
        raise ArchError(f"not a {'JSON' if path.suffix == '.json' else 'JSON or YAML'} arch file ({error})", source) from None
    if not (isinstance(data, dict) and "arch" in data):
        return Arch.from_dict(data, space, source=source)
    problems = [
        Problem(str(key), f"unknown key of an arch file; allowed keys: {list(ARCH_FILE_KEYS)}{did_you_mean(key, ARCH_FILE_KEYS)}")
        for key in data
        if key not in ARCH_FILE_KEYS
    ]
    if "space" in data and not isinstance(data["space"], str):
        problems.append(Problem("space", f"must be the name of the arch's space, got {data['space']!r}"))
    try:
        arch = Arch.from_dict(data["arch"], space)
    except ArchError as error:
        problems += [Problem(f"arch.{problem.path}" if problem.path else "arch", problem.message) for problem in error.problems]
    if problems:
        raise ArchError(problems, source)
    return arch


EXPORT_FILES = frozenset({"model.onnx", "model.int8.onnx", EXPORT_ARCH_FILE, EXPORT_WEIGHTS_FILE, EXPORT_SUMMARY_FILE})
"""The files an export folder holds; a folder with anything else in it is not replaced by an export."""


def _check_replaceable(out_dir: Path) -> None:
    """An export replaces its folder as a whole: refuse a folder that holds files an export did not write."""
    if not out_dir.is_dir():
        return
    foreign = sorted(path.name for path in out_dir.iterdir() if path.name not in EXPORT_FILES)
    if foreign:
        raise RunError(f"{out_dir} holds files that are not an export's ({', '.join(foreign[:5])}); choose a new or empty folder for --out")


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What an export wrote, with the accuracies of the written ONNX models (``onnx_accuracy``) on the test and
    validation splits; the INT8 ones are None when no INT8 model was written."""

    out_dir: Path
    export: ExportResult
    test_accuracy: float
    int8_error: str | None = None
    val_accuracy: float | None = None
    int8_test_accuracy: float | None = None
    int8_val_accuracy: float | None = None


@dataclass(frozen=True, slots=True)
class ExportContext:
    """A trained run loaded once for exporting several archs."""

    run_dir: Path
    config: RunConfig
    supernet: Supernet
    task_data: TaskData


def load_export_context(run_dir: Path) -> ExportContext:
    config, supernet, _ = load_run(Path(run_dir))
    task_data = load_task_data(config.task, config.space, seed=config.training.seed)
    return ExportContext(Path(run_dir), config, supernet, task_data)


@locks_run_dir("run_dir", out="out")
def export_arch(run_dir: Path, arch_text: str, *, int8: bool, out: Path | None = None) -> ExportReport:
    """Recalibrate BN for the arch, extract the static subnet and write it to ``out`` (default
    ``run_dir/exports/<arch short name>``): ``model.onnx`` [+ ``model.int8.onnx``], ``arch.yaml``,
    ``weights.safetensors`` and ``export.json`` with the checks' figures."""
    context = load_export_context(run_dir)
    arch = parse_arch(arch_text, context.config.space)
    return export_loaded(context, arch, int8=int8, out=out)


@locks_run_dir("context.run_dir", out="out")
def export_loaded(context: ExportContext, arch: Arch, *, int8: bool, out: Path | None = None, int8_optional: bool = False) -> ExportReport:
    """``export_arch`` on a loaded run. With ``int8_optional`` an INT8 model that fails its agreement check is
    left out (the reason is in ``int8_error`` and ``export.json``) instead of failing the export.

    BN is recalibrated on the run's calibration batches (``run_calibration_batches``) and INT8 calibrated on
    ``int8_calibration_inputs``, as in the search, so the files are those the search scored; the accuracies in the
    report and ``export.json`` are those of the written files (``onnx_accuracy``).

    Everything is written into a sibling staging folder (``<out>.tmp``) that is renamed into place once complete
    (``nas.durable.replace_folder``), so a killed export never leaves a half folder under the export's name, and an
    export that fails leaves the previous one as it was. Writing inside the run folder holds its lock."""
    config, supernet, task_data = context.config, context.supernet, context.task_data
    arch = config.space.canonical(arch)
    recalibrate_batch_norm(supernet, arch, run_calibration_batches(config, task_data.train))
    static = supernet.extract(arch).eval()
    out_dir = Path(out) if out else RunDir(context.run_dir).exports / arch.short_name()
    _check_replaceable(out_dir)
    staging = durable.staging_folder(out_dir)
    durable.clear_leftovers(out_dir)
    staging.mkdir(parents=True)
    inputs = int8_calibration_inputs(task_data.train)
    calibration = prepare_batch(inputs, inputs, arch)[0]
    validation = prepare_batch(task_data.val.inputs, task_data.val.targets, arch)[0]
    int8_error = None
    try:
        result = export_subnet(static, arch, config.space.name, staging, calibration=calibration, validation=validation, int8=False)
        if int8:
            quantized = quantize_int8(result.path, staging / "model.int8.onnx", calibration=calibration, validation=validation)
            result = dataclasses.replace(quantized, max_abs_error=result.max_abs_error)
    except ExportError as error:
        if not (int8 and int8_optional and (staging / "model.onnx").exists()):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        int8_error = str(error)
        logger.warning("%s: INT8 model left out: %s", arch.short_name(), error)
    accuracies = {"val": onnx_accuracy(result.path, arch, task_data.val), "test": onnx_accuracy(result.path, arch, task_data.test)}
    if result.int8_path is not None:
        accuracies.update(int8_val=onnx_accuracy(result.int8_path, arch, task_data.val), int8_test=onnx_accuracy(result.int8_path, arch, task_data.test))
    (staging / EXPORT_ARCH_FILE).write_text(yaml.safe_dump({"space": config.space.name, "arch": arch.to_dict()}, sort_keys=False))
    save_file({name: tensor.contiguous() for name, tensor in static.state_dict().items()}, str(staging / EXPORT_WEIGHTS_FILE))
    summary: dict[str, Any] = {
        "arch": arch.to_dict(),
        "test_accuracy": accuracies["test"],
        "val_accuracy": accuracies["val"],
        "onnx": str(result.path.name),
        "onnx_max_abs_error": result.max_abs_error,
        "int8": result.int8_path.name if result.int8_path else None,
        "int8_top1_agreement": result.int8_top1_agreement,
        "int8_test_accuracy": accuracies.get("int8_test"),
        "int8_val_accuracy": accuracies.get("int8_val"),
        "int8_error": int8_error,
    }
    jsonio.write(staging / EXPORT_SUMMARY_FILE, summary)
    durable.replace_folder(staging, out_dir)
    result = dataclasses.replace(result, path=out_dir / result.path.name, int8_path=out_dir / result.int8_path.name if result.int8_path else None)
    return ExportReport(out_dir, result, accuracies["test"], int8_error, accuracies["val"], accuracies.get("int8_test"), accuracies.get("int8_val"))
