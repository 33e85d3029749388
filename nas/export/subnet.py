"""Steps that combine training, evaluation and export for the CLI: a trained run's subnet out as ONNX."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from nas.data.splits import TaskData
from nas.data.tasks import load_task_data
from nas.export.onnx import ExportError, ExportResult, export_subnet
from nas.run_dir import EXPORT_ARCH_FILE, EXPORT_SUMMARY_FILE, EXPORT_WEIGHTS_FILE, RunDir
from nas.space.schema import RunConfig
from nas.supernets.space import Arch, ArchError, SearchSpace
from nas.supernets.supernet import Supernet
from nas.training.evaluation import accuracy, prepare_batch, recalibrate_batch_norm
from nas.training.loop import load_run

logger = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 256


def parse_arch(text: str, space: SearchSpace) -> Arch:
    """'largest', 'smallest', arch JSON, or a .json / .yaml file holding an arch (or a mapping with an 'arch' key);
    raises ``ArchError`` when it is malformed or outside ``space``."""
    if text in ("largest", "smallest"):
        return getattr(space, text)()
    path = Path(text)
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ArchError(f"{path}: not a JSON or YAML arch file ({error})") from None
        if isinstance(data, dict) and "arch" in data:
            data = data["arch"]
        arch = Arch.from_dict(data)
    elif text.lstrip().startswith("{"):
        arch = Arch.from_json(text)
    else:
        raise ArchError(f"--arch must be 'largest', 'smallest', arch JSON or an existing file, got {text!r}")
    space.check(arch)
    return arch


@dataclass(frozen=True, slots=True)
class ExportReport:
    out_dir: Path
    export: ExportResult
    test_accuracy: float
    int8_error: str | None = None


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


def export_arch(run_dir: Path, arch_text: str, *, int8: bool, out: Path | None = None) -> ExportReport:
    """Recalibrate BN for the arch, extract the static subnet and write it to ``out`` (default
    ``run_dir/exports/<arch short name>``): ``model.onnx`` [+ ``model.int8.onnx``], ``arch.yaml``,
    ``weights.safetensors`` and ``export.json`` with the checks' figures."""
    context = load_export_context(run_dir)
    arch = parse_arch(arch_text, context.config.space)
    return export_loaded(context, arch, int8=int8, out=out)


def export_loaded(context: ExportContext, arch: Arch, *, int8: bool, out: Path | None = None, int8_optional: bool = False) -> ExportReport:
    """``export_arch`` on a loaded run. With ``int8_optional`` an INT8 model that fails its agreement check is
    left out (the reason is in ``int8_error`` and ``export.json``) instead of failing the export."""
    config, supernet, task_data = context.config, context.supernet, context.task_data
    training = config.training
    recalibrate_batch_norm(supernet, arch, task_data.train, batch_size=training.batch_size, num_batches=training.calibration_batches, seed=training.seed)
    static = supernet.extract(arch).eval()
    test_accuracy = accuracy(static, arch, task_data.test)
    out_dir = Path(out) if out else RunDir(context.run_dir).exports / arch.short_name()
    calibration = prepare_batch(task_data.train.inputs[:CALIBRATION_SAMPLES], task_data.train.targets[:CALIBRATION_SAMPLES], arch)[0]
    validation = prepare_batch(task_data.val.inputs, task_data.val.targets, arch)[0]
    int8_error = None
    try:
        result = export_subnet(static, arch, config.space.name, out_dir, calibration=calibration, validation=validation, int8=int8)
    except ExportError as error:
        if not (int8 and int8_optional and (out_dir / "model.onnx").exists()):
            raise
        int8_error = str(error)
        result = ExportResult(out_dir / "model.onnx", float("nan"))
        logger.warning("%s: INT8 model left out: %s", arch.short_name(), error)
    (out_dir / EXPORT_ARCH_FILE).write_text(yaml.safe_dump({"space": config.space.name, "arch": arch.to_dict()}, sort_keys=False))
    save_file({name: tensor.contiguous() for name, tensor in static.state_dict().items()}, str(out_dir / EXPORT_WEIGHTS_FILE))
    summary: dict[str, Any] = {
        "arch": arch.to_dict(),
        "test_accuracy_pytorch": test_accuracy,
        "onnx": str(result.path.name),
        "onnx_max_abs_error": result.max_abs_error,
        "int8": result.int8_path.name if result.int8_path else None,
        "int8_top1_agreement": result.int8_top1_agreement,
        "int8_error": int8_error,
    }
    (out_dir / EXPORT_SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return ExportReport(out_dir, result, test_accuracy, int8_error)
