"""Archs that come in through ``nas export --arch`` (JSON, YAML, exported ``arch.yaml``, exported ONNX) are checked by
the one arch validation: every problem with its path, exit 2, never a traceback; a correctly typed arch exports with
the space's own values in ``arch.yaml`` and the ONNX metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from nas.cli import main
from nas.export.onnx import read_arch, read_metadata
from nas.space.schema import parse_config
from nas.supernets.space import Arch
from nas.training.loop import train
from tests.helpers import TINY_DIGITS_SPACE

SPACE = TINY_DIGITS_SPACE + "training: {epochs: 1, batch_size: 128, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 0}\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("arch_input")
    train(parse_config(SPACE, "tiny.yaml"), folder / "run")
    return folder / "run"


def largest() -> dict[str, Any]:
    return json.loads(parse_config(SPACE).space.largest().to_json())


CASES = {
    "width": (lambda data: data["stages"][0].update(width=12.0), "stages[0].width: must be one of [8, 12], got 12.0 (a float; this field takes integers)"),
    "kernel_size": (
        lambda data: data["stages"][0]["blocks"][0].update(kernel_size=5.0),
        "stages[0].blocks[0].kernel_size: must be one of [3, 5], got 5.0 (a float; this field takes integers)",
    ),
    "squeeze_excite": (
        lambda data: data["stages"][0]["blocks"][0].update(squeeze_excite=1),
        "stages[0].blocks[0].squeeze_excite: must be one of [False, True], got 1 (an integer; this field takes true or false)",
    ),
    "resolution": (lambda data: data.update(resolution=8.0), "resolution: must be one of [6, 8], got 8.0 (a float; this field takes integers)"),
}


def export(run_dir: Path, arch: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["export", str(run_dir), "--arch", arch, *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_issue_case_exits_2_with_its_path(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    change, expected = CASES[case]
    data = largest()
    change(data)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(data))
    code, err = export(run_dir, str(path), capsys)
    assert code == 2
    assert err == f"error: {path}: {expected}\n"
    code, err = export(run_dir, json.dumps(data), capsys)
    assert (code, err) == (2, f"error: --arch: {expected}\n")
    assert not (run_dir / "exports").exists(), "nothing is exported"


def test_an_edited_arch_yaml_lists_every_problem_with_its_yaml_path(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = largest()
    for change, _ in CASES.values():
        change(data)
    data["stages"][0]["blocks"][0]["kernal_size"] = 3
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump({"space": "tiny", "arch": data, "note": "x"}, sort_keys=False))
    code, err = export(run_dir, str(path), capsys)
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == f"error: {path}: 6 problem(s)"
    assert lines[1].startswith("  - note: unknown key of an arch file; allowed keys: ['space', 'arch']")
    for _, expected in CASES.values():
        assert f"  - arch.{expected}" in lines
    assert any(line.startswith("  - arch.stages[0].blocks[0].kernal_size: unknown field of 'mbconv'") for line in lines)


def test_the_cli_never_shows_a_traceback(run_dir: Path, tmp_path: Path) -> None:
    data = largest()
    for change, _ in CASES.values():
        change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    process = subprocess.run([sys.executable, "-m", "nas.cli", "export", str(run_dir), "--arch", str(path)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr
    assert f"{path}: 4 problem(s)" in process.stderr
    for _, expected in CASES.values():
        assert expected in process.stderr


def test_a_correctly_typed_arch_exports_with_the_spaces_own_values(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``expand_ratio`` is a number field: ``3.0`` is the choice ``3``, and what is written back is the space's ``3``."""
    space = parse_config(SPACE).space
    data = largest()
    data["stages"][0]["blocks"][0]["expand_ratio"] = 3.0
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(data))
    code, err = export(run_dir, str(path), capsys, "--out", str(tmp_path / "out"))
    assert code == 0, err
    written = yaml.safe_load((tmp_path / "out" / "arch.yaml").read_text())
    assert written["arch"] == json.loads(space.largest().to_json())
    assert type(written["arch"]["resolution"]) is int and type(written["arch"]["stages"][0]["blocks"][0]["expand_ratio"]) is int
    model = tmp_path / "out" / "model.onnx"
    assert read_metadata(model)["nasforge_arch"] == space.largest().to_json()
    assert read_arch(model, space) == space.largest()
    # What an export writes comes back in: its arch.yaml and its model.onnx are valid --arch inputs.
    for source in (tmp_path / "out" / "arch.yaml", model):
        code, err = export(run_dir, str(source), capsys, "--out", str(tmp_path / f"again_{source.suffix[1:]}"))
        assert code == 0, err
        assert Arch.from_dict(yaml.safe_load((tmp_path / f"again_{source.suffix[1:]}" / "arch.yaml").read_text())["arch"], space) == space.largest()
