"""Every example in examples/ runs to the end with small settings."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 900


def run(command: list[str], cwd: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **environment})
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def front_members(run_dir: Path) -> list[dict]:
    summary = json.loads((run_dir / "pareto.json").read_text())
    members = [member for front in summary["fronts"].values() for member in front["members"]]
    assert members, "the front is empty"
    return members


def test_every_example_folder_has_a_test() -> None:
    tested = {"custom_block", "image_folder", "npz_arrays", "python_api", "ray_cluster"}
    assert {entry.name for entry in EXAMPLES.iterdir() if entry.is_dir() and not entry.name.startswith(("_", "."))} == tested


@pytest.mark.parametrize("example", ["image_folder", "npz_arrays"])
def test_data_examples_search_and_export(example: str, tmp_path: Path) -> None:
    run([sys.executable, str(EXAMPLES / example / "run.py"), "--out", str(tmp_path / "out"), "--epochs", "1", "--trials", "4"], cwd=tmp_path)
    run_dir = tmp_path / "out" / "run"
    for member in front_members(run_dir):
        assert member["export"]["error"] is None
        assert (run_dir / member["export"]["folder"] / "model.onnx").is_file()


def test_custom_block_example_runs_with_its_plugin(tmp_path: Path) -> None:
    user = tmp_path / "user"
    shutil.copytree(EXAMPLES / "custom_block", user)
    space = user / "space.yaml"
    text = re.sub(r"training: \{epochs: \d+", "training: {epochs: 1", space.read_text())
    space.write_text(re.sub(r"search: \{trials: \d+", "search: {trials: 4", text))
    result = run([sys.executable, "-m", "nas.cli", "run", str(space), "--out", str(tmp_path / "run"), "--no-int8"], cwd=tmp_path)
    assert "conv_mixer.py" in result.stderr
    with open(tmp_path / "run" / "trials.csv") as file:
        archs = [row["arch"] for row in csv.DictReader(file)]
    assert any("conv_mixer" in arch for arch in archs)
    assert all(member["export"]["error"] is None for member in front_members(tmp_path / "run"))


def test_python_api_example(tmp_path: Path) -> None:
    result = run([sys.executable, str(EXAMPLES / "python_api" / "search.py"), "--out", str(tmp_path / "run"), "--epochs", "1", "--trials", "4"], cwd=tmp_path)
    assert "front" in result.stdout


@pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="the ray command line is not installed beside this Python")
def test_ray_cluster_example_spreads_the_search_over_two_nodes(tmp_path: Path) -> None:
    space = tmp_path / "tiny.yaml"
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import TINY_DIGITS_SPACE

    space.write_text(TINY_DIGITS_SPACE + "training: {epochs: 1, batch_size: 64}\nsearch: {targets: [cpu_fp32], measure_seconds: 0.2}\n")
    environment = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "NASFORGE_RAY_PORT": "6391"}
    run(["bash", str(EXAMPLES / "ray_cluster" / "run.sh"), str(tmp_path / "run"), str(space), "6"], cwd=tmp_path, **environment)
    with open(tmp_path / "run" / "trials.csv") as file:
        rows = list(csv.DictReader(file))
    assert len({row["arch"] for row in rows}) >= 6
    nodes = {match.group(1) for row in rows if (match := re.search(r"ray node (\w+)", row["worker"]))}
    assert len(nodes) == 2, f"evaluations ran on Ray nodes {nodes}"
