"""The README's main job: `nas run` on the embedded digits quickstart trains, evaluates and exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nas.export import read_metadata
from nas.supernets.space import Arch


@pytest.mark.slow
def test_nas_run_quickstart_reaches_the_accuracy_targets_and_exports_checked_onnx(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "nas.cli", "run", "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["largest"]["test"] >= 0.97
    assert metrics["smallest"]["test"] >= 0.93
    for name in ("largest", "smallest"):
        folder = tmp_path / "run" / "exports" / name
        summary = json.loads((folder / "export.json").read_text())
        assert summary["onnx_max_abs_error"] <= 1e-4
        assert summary["int8_top1_agreement"] >= 0.9
        for file in ("model.onnx", "model.int8.onnx"):
            onnx.checker.check_model(str(folder / file), full_check=True)
        arch = Arch.from_json(read_metadata(folder / "model.onnx")["nasforge_arch"])
        assert arch.to_dict() == summary["arch"]
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": np.zeros((4, 1, arch.resolution, arch.resolution), np.float32)})[0]
        assert logits.shape == (4, 10)
    assert "largest" in result.stdout and "INT8" in result.stdout
