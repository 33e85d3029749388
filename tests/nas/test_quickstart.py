"""The README's main job: `nas run` on the embedded digits quickstart trains, searches, reports and exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nas.data.tasks import load_task_data
from nas.export.onnx import read_metadata
from nas.space.schema import load_config
from nas.supernets.space import Arch
from nas.training.evaluation import prepare_batch


@pytest.mark.slow
def test_nas_run_quickstart_reaches_the_accuracy_targets_and_exports_checked_fronts(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "nas.cli", "run", "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["largest"]["test"] >= 0.97
    assert metrics["smallest"]["test"] >= 0.93

    summary = json.loads((run_dir / "pareto.json").read_text())
    config = load_config("digits_quick")
    task_data = load_task_data(config.task, config.space, seed=config.training.seed)
    assert summary["distinct_trials"] == 40
    assert set(summary["fronts"]) == {"cpu_fp32", "cpu_int8"}
    for target, front in summary["fronts"].items():
        members = front["members"]
        assert len(members) >= 2, f"a front on {target} should trade accuracy for latency"
        latencies = [member["latency_ms"][target]["median_ms"] for member in members]
        accuracies = [member["val_accuracy"] for member in members]
        assert latencies == sorted(latencies) and accuracies == sorted(accuracies), "a front rises with latency"
        assert accuracies[-1] >= 0.95
        for member in members:
            export = member["export"]
            folder = run_dir / export["folder"]
            assert export["onnx_max_abs_error"] <= 1e-4
            files = ["model.onnx"] + (["model.int8.onnx"] if export["int8_top1_agreement"] is not None else [])
            for file in files:
                onnx.checker.check_model(str(folder / file), full_check=True)
            arch = Arch.from_json(read_metadata(folder / "model.onnx")["nasforge_arch"])
            assert arch.to_dict() == member["arch"]
            session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
            logits = session.run(None, {"input": np.zeros((4, 1, arch.resolution, arch.resolution), np.float32)})[0]
            assert logits.shape == (4, 10)
            # the reported validation accuracy is the shipped model's (model.int8.onnx on the INT8 front)
            shipped = ort.InferenceSession(str(folder / member["model"]), providers=["CPUExecutionProvider"])
            inputs, targets = prepare_batch(task_data.val.inputs, task_data.val.targets, arch)
            val_accuracy = float(np.mean(shipped.run(None, {"input": inputs.numpy()})[0].argmax(-1) == targets.numpy()))
            assert member["val_accuracy"] == val_accuracy, f"trial {member['trial']} on {target}"
    report = (run_dir / "report.md").read_text()
    assert "## INT8 vs fp32 by op type (this CPU)" in report and "Conv" in report
    assert (run_dir / "pareto.png").exists() and (run_dir / "trials.csv").exists()
    assert "front on cpu_fp32" in result.stdout and "front on cpu_int8" in result.stdout
