"""Every number a run reports is the number of the model it ships, and every JSON file it writes is strict JSON.

A small `nas run` (the tiny digits space, with batch norm) is checked end to end: for every member of every front,
the validation accuracy in pareto.json, trials.csv and report.md equals that of the exported ONNX file the front
ships for its target (``model.onnx``; ``model.int8.onnx`` on an INT8 target), run here by ONNX Runtime on the
validation split, and the test accuracy in export.json equals the file's on the test split. Equality is exact:
the search scores the very file the export writes, through the same BN recalibration batches.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import optuna
import pytest
from helpers import TINY_DIGITS_SPACE

from nas import jsonio
from nas.data.splits import Split
from nas.data.tasks import load_task_data
from nas.export.onnx import read_metadata
from nas.latency.op_profile import compare_op_types
from nas.run_dir import RunDir
from nas.search.study import distinct_trials, feasible
from nas.space.schema import load_config
from nas.supernets.space import Arch
from nas.training.evaluation import prepare_batch

RUN_SPACE = (
    TINY_DIGITS_SPACE
    + "training: {epochs: 2, batch_size: 64, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 3}\n"
    + "search: {trials: 6, sampler: nsga2, population_size: 4, targets: [cpu_fp32, cpu_int8], measure_seconds: 0.1}\n"
)


def strict_loads(text: str) -> Any:
    """A strict reader, like JavaScript's JSON.parse: NaN, Infinity and -Infinity are errors."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not standard JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `nas run` (train, search, export with INT8, report) of the tiny digits space."""
    folder = tmp_path_factory.mktemp("shipped")
    (folder / "tiny.yaml").write_text(RUN_SPACE)
    result = subprocess.run(
        [sys.executable, "-m", "nas.cli", "run", "tiny.yaml", "--out", "run"], cwd=folder, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def onnx_accuracy_here(path: Path, arch: Arch, split: Split) -> float:
    """The model's top-1 accuracy on the whole split in one ONNX Runtime call (default session options), inputs
    prepared by nasforge's own ``prepare_batch`` (resized to the arch's resolution)."""
    inputs, targets = prepare_batch(split.inputs, split.targets, arch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": inputs.numpy()})[0]
    return float(np.mean(logits.argmax(-1) == targets.numpy()))


def report_rows(report: str) -> dict[str, dict[int, list[str]]]:
    """report.md front tables: target -> trial number -> the row's cells."""
    rows: dict[str, dict[int, list[str]]] = {}
    target = None
    for line in report.splitlines():
        if line.startswith("## Front on `"):
            target = line.split("`")[1]
            rows[target] = {}
        elif line.startswith("## "):
            target = None
        elif target and line.startswith("| ") and line.split("|")[1].strip().isdigit():
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[target][int(cells[0])] = cells
    return rows


def test_every_front_member_reports_the_accuracy_of_the_model_it_ships(run: Path) -> None:
    config = load_config(str(run / "config.yaml"))
    data = load_task_data(config.task, config.space, seed=config.training.seed)
    summary = strict_loads((run / "pareto.json").read_text())
    with open(run / "trials.csv") as file:
        csv_rows = {int(row["number"]): row for row in csv.DictReader(file)}
    report = report_rows((run / "report.md").read_text())
    checked = 0
    for target, front in summary["fronts"].items():
        assert front["members"], f"the front on {target} is empty"
        int8 = target == "cpu_int8"
        for member in front["members"]:
            folder = run / member["export"]["folder"]
            model = folder / ("model.int8.onnx" if int8 else "model.onnx")
            assert member["model"] == model.name == member["export"]["model"]
            arch = Arch.from_json(read_metadata(model)["nasforge_arch"])
            assert arch.to_dict() == member["arch"]
            shipped_val = onnx_accuracy_here(model, arch, data.val)
            shipped_test = onnx_accuracy_here(model, arch, data.test)
            where = f"trial {member['trial']} on {target}"
            assert member["val_accuracy"] == shipped_val, f"{where}: pareto.json {member['val_accuracy']} vs shipped {shipped_val}"
            assert member["export"]["val_accuracy"] == shipped_val, where
            assert float(csv_rows[member["trial"]]["int8_accuracy" if int8 else "accuracy"]) == shipped_val, f"{where}: trials.csv"
            assert report[target][member["trial"]][2] == f"{shipped_val:.4f}", f"{where}: report.md"
            exported = strict_loads((folder / "export.json").read_text())
            assert exported["int8_test_accuracy" if int8 else "test_accuracy"] == shipped_test, f"{where}: export.json"
            assert member["export"]["test_accuracy"] == shipped_test, where
            assert report[target][member["trial"]][3] == f"{shipped_test:.4f}", f"{where}: report.md test"
            checked += 1
    assert checked >= 2
    # Training's final metrics recalibrate through the same batches (scored in PyTorch on the supernet): the largest
    # subnet, an anchor of every search, gets the same validation accuracy as its shipped fp32 model.
    metrics = strict_loads((run / "metrics.json").read_text())
    largest = config.space.largest().to_json()
    row = next(row for row in csv_rows.values() if row["arch"] == largest and not row["duplicate_of"])
    assert abs(metrics["largest"]["val"] - float(row["accuracy"])) <= 1 / len(data.val.targets) + 1e-12


def test_calibration_batches_are_the_shuffled_training_batches_in_order() -> None:
    """One recalibration path: the batches a run's evaluations use are the first ``calibration_batches`` batches of
    its seeded shuffle, in that order, whoever draws them."""
    import torch

    from nas.data.splits import iterate_batches
    from nas.training.evaluation import calibration_batches

    train = Split(torch.arange(70 * 2, dtype=torch.float32).reshape(70, 2), torch.arange(70))
    batches = calibration_batches(train, batch_size=16, num_batches=3, seed=5)
    expected = [inputs for inputs, _ in iterate_batches(train, 16, shuffle=True, generator=torch.Generator().manual_seed(5))][:3]
    assert len(batches) == 3 and all(torch.equal(got, want) for got, want in zip(batches, expected, strict=True))
    assert torch.equal(calibration_batches(train, batch_size=16, num_batches=3, seed=5).inputs, batches.inputs)
    short = calibration_batches(train, batch_size=32, num_batches=5, seed=5)
    assert [len(batch) for batch in short] == [32, 32, 6], "a split smaller than the batches asked for gives what it has"


def test_every_json_file_the_run_writes_is_strict(run: Path) -> None:
    files = sorted(path for pattern in ("*.json", "*.jsonl") for path in run.rglob(pattern))
    names = {path.relative_to(run).as_posix() for path in files}
    assert {"pareto.json", "metrics.json", "log.jsonl", "checkpoint/state.json", "search/latency.jsonl"} <= names
    assert any(name.endswith("/export.json") for name in names)
    for path in [*files, RunDir(run).study]:
        text = path.read_text()
        records = text.splitlines() if path.suffix in (".jsonl", ".journal") else [text]
        for number, record in enumerate(records, start=1):
            if record.strip():
                try:
                    strict_loads(record)
                except ValueError as error:
                    pytest.fail(f"{path.relative_to(run)} record {number} is not strict JSON: {error}")
    for model in run.rglob("*.onnx"):
        metadata = read_metadata(model)
        for key in ("nasforge_arch", "nasforge_input_shape", "nasforge_quantization"):
            if key in metadata:
                strict_loads(metadata[key])
    summary = strict_loads((run / "pareto.json").read_text())
    for row in summary.get("int8_vs_fp32_op_types", []):
        assert (row["speedup"] is None) == ("speedup_note" in row), row


def test_non_finite_numbers_are_written_as_null_with_a_reason(tmp_path: Path) -> None:
    rows = compare_op_types({"Conv": 10.0, "Relu": 2.0}, {"Conv": 4.0, "Quantize/Dequantize": 1.0})
    assert any(math.isinf(row.speedup) for row in rows), "an fp32-only kind has an infinite ratio"
    from nas.report.writers import op_type_summary

    summary = {
        "int8_vs_fp32_op_types": op_type_summary(rows),
        "export": {"onnx_max_abs_error": float("nan"), "int8_top1_agreement": 0.95},
        "values": [1.0, float("inf"), float("-inf")],
    }
    path = tmp_path / "summary.json"
    jsonio.write(path, summary)
    loaded = strict_loads(path.read_text())
    by_kind = {row["kind"]: row for row in loaded["int8_vs_fp32_op_types"]}
    assert by_kind["Conv"]["speedup"] == 2.5 and "speedup_note" not in by_kind["Conv"]
    assert by_kind["Relu"]["speedup"] is None and by_kind["Relu"]["speedup_note"] == "only in fp32"
    assert by_kind["Quantize/Dequantize"]["speedup"] is None and by_kind["Quantize/Dequantize"]["speedup_note"] == "only in INT8"
    assert loaded["export"] == {"onnx_max_abs_error": None, "int8_top1_agreement": 0.95}
    assert loaded["values"] == [1.0, None, None]
    with pytest.raises(jsonio.NonFiniteError, match=r"\$\.export\.onnx_max_abs_error"):
        jsonio.dumps(summary, nonfinite="error")
    with pytest.raises(ValueError, match="NaN"):
        jsonio.loads('{"a": NaN}')
    jsonio.append_line(tmp_path / "log.jsonl", {"epoch": 1, "loss": float("nan")})
    assert strict_loads((tmp_path / "log.jsonl").read_text()) == {"epoch": 1, "loss": None}


def test_optuna_user_attributes_never_hold_nan_or_infinity() -> None:
    from nas.search.evaluators import Evaluation
    from nas.search.loop import _tell_evaluation
    from nas.search.settings import SearchSettings

    settings = SearchSettings(trials=1, sampler="random", population_size=2, targets=("cpu_fp32", "cpu_int8"), threads=1, batch_size=1, measure_seconds=0.1)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    trial = study.ask()
    measurement = {"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.1, "cv": float("nan"), "samples": 3, "stable": False, "seconds": float("inf")}
    evaluation = Evaluation("{}", 0.5, 10, 100, {}, float("nan"), 0.1, "here", float("inf"), None)
    _tell_evaluation(study, trial, evaluation, {"cpu_fp32": measurement, "cpu_int8": measurement}, settings)
    attrs = study.trials[0].user_attrs
    assert attrs["int8_top1_agreement"] is None and attrs["int8_accuracy"] is None
    assert attrs["latency_cpu_fp32_ms"]["cv"] is None and attrs["latency_cpu_fp32_ms"]["seconds"] is None
    strict_loads(json.dumps(attrs))


@pytest.fixture()
def trained_copy(run: Path, tmp_path: Path) -> Path:
    """The module run's trained supernet in a fresh run folder (no search, no exports)."""
    fresh = tmp_path / "run"
    fresh.mkdir()
    for name in ("config.yaml", "origin.json", "metrics.json", "log.jsonl"):
        if (run / name).exists():
            shutil.copy(run / name, fresh / name)
    shutil.copytree(run / "checkpoint", fresh / "checkpoint")
    return fresh


def _search(run_dir: Path) -> Any:
    from nas.search.loop import run_search
    from nas.search.settings import SearchSettings
    from nas.space.schema import parse_config

    settings = SearchSettings.from_config(parse_config(RUN_SPACE, "tiny.yaml").search, trials=4)
    return run_search(run_dir, settings).study


def test_a_trial_whose_int8_model_fails_the_agreement_rule_is_on_no_int8_front(trained_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search applies the export's rule (``MIN_INT8_AGREEMENT``, the one hook both read): made impossible here, no
    trial has an INT8 model, so the INT8 front is empty and pareto.json says why for each trial."""
    from nas.export import onnx
    from nas.report.writers import export_fronts, pareto_summary
    from nas.search.front import pareto_front

    monkeypatch.setattr(onnx, "MIN_INT8_AGREEMENT", 1.01)
    study = _search(trained_copy)
    trials = [trial for trial in distinct_trials(study) if feasible(trial)]
    assert len(trials) == 4 and all("below the required 1.0100" in trial.user_attrs["int8_error"] for trial in trials)
    assert pareto_front(study, "cpu_int8") == [] and pareto_front(study, "cpu_fp32")
    exports = export_fronts(trained_copy, study, int8=True)
    summary = strict_loads(jsonio.dumps(pareto_summary(study, exports, trained_copy)))
    assert summary["fronts"]["cpu_int8"]["members"] == []
    assert {entry["trial"] for entry in summary["fronts"]["cpu_int8"]["absent"]} == {trial.number for trial in trials}
    assert all("no INT8 model" in entry["reason"] for entry in summary["fronts"]["cpu_int8"]["absent"])
    assert summary["fronts"]["cpu_fp32"]["members"] and summary["fronts"]["cpu_fp32"]["absent"] == []
    for export in exports.values():
        assert export.report is not None and export.report.export.int8_path is None and "below the required" in export.report.int8_error
        assert not (export.out_dir / "model.int8.onnx").exists()
        assert strict_loads((export.out_dir / "export.json").read_text())["onnx_max_abs_error"] <= 1e-4


def test_an_int8_export_that_fails_its_check_keeps_the_member_off_the_int8_front(trained_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search found INT8 models, but the export's check refuses them (forced through the same hook): each refused
    member leaves the INT8 front, the trials that front then reaches are exported in turn, and pareto.json names the
    failed export as the reason; the fp32 front keeps its members."""
    from nas.export import onnx
    from nas.report.writers import export_fronts, front_trials, pareto_summary
    from nas.search.front import pareto_front

    study = _search(trained_copy)
    int8_front = [trial.number for trial in pareto_front(study, "cpu_int8")]
    assert int8_front, "the search's INT8 models pass the usual rule"
    monkeypatch.setattr(onnx, "MIN_INT8_AGREEMENT", 1.01)
    exports = export_fronts(trained_copy, study, int8=True)
    assert set(front_trials(study)) <= set(exports)
    summary = strict_loads(jsonio.dumps(pareto_summary(study, exports, trained_copy)))
    assert summary["fronts"]["cpu_int8"]["members"] == []
    absent = {entry["trial"]: entry["reason"] for entry in summary["fronts"]["cpu_int8"]["absent"]}
    assert set(int8_front) <= set(absent)
    assert all(reason.startswith("the INT8 export failed: INT8 top-1 agreement") for reason in absent.values())
    assert [member["trial"] for member in summary["fronts"]["cpu_fp32"]["members"]] == [trial.number for trial in pareto_front(study, "cpu_fp32")]
