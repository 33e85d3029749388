"""The wheel: no top-level ``kernels`` package, and built-in spaces found by name from the installed files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        check=True, cwd=out,
    )
    (path,) = out.glob("nasforge-*.whl")
    return path


def test_wheel_installs_everything_inside_the_nas_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"nas"}
    assert "nas/kernels/gla/reference.py" in names
    assert "nas/supernets/blocks/mbconv.py" in names
    assert "nas/search_spaces/digits_quick.yaml" in names
    assert "nas/search_spaces/ofa_mbv3.yaml" in names


def test_installed_wheel_finds_builtin_spaces_by_name_and_has_no_kernels_package(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel), "-q"], check=True)
    script = (
        "import importlib.util, nas, nas.space.schema\n"
        f"assert nas.__file__.startswith({str(target)!r}), nas.__file__\n"
        "assert importlib.util.find_spec('kernels') is None\n"
        "config = nas.config.load_config('digits_quick')\n"
        "assert str(config.space.stages[0].blocks[0].type) == 'mbconv'\n"
        "import nas.kernels.gla, nas.supernets.blocks.gla\n"
        "print(sorted(nas.config.builtin_spaces()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "digits_quick" in result.stdout and "mqar_quick" in result.stdout
