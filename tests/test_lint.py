"""Lint, format and type checks, run with the tools the ``test`` extra installs (configuration in pyproject.toml).

ruff covers the whole tree. mypy covers ``supernets/`` and ``kernels/`` as the wheel installs them, ``nas.supernets``
and ``nas.kernels`` (``supernets/blocks/gla.py`` imports ``nas.kernels.gla``): it checks a temporary ``nas`` package
whose ``supernets`` and ``kernels`` are links to the source folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPED_PACKAGES = ("supernets", "kernels")

pytestmark = pytest.mark.lint


def run_tool(arguments: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python -m <arguments>`` and return its exit status and its combined output."""
    result = subprocess.run([sys.executable, "-m", *arguments], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    return result.returncode, result.stdout


def test_ruff_check(tmp_path: Path) -> None:
    status, output = run_tool(["ruff", "check", "--no-fix", "--output-format", "concise", "--cache-dir", str(tmp_path / "ruff"), "."], ROOT)
    assert status == 0, f"ruff check . failed (fix the code, or run `ruff check --fix`):\n{output}"


def test_ruff_format(tmp_path: Path) -> None:
    status, output = run_tool(["ruff", "format", "--check", "--cache-dir", str(tmp_path / "ruff"), "."], ROOT)
    assert status == 0, f"ruff format --check . failed (run `ruff format`):\n{output}"


def assemble_installed_layout(destination: Path) -> Path:
    """A ``nas`` package under ``destination`` laid out as installed: ``nas/__init__.py``, ``nas/supernets`` and
    ``nas/kernels`` link to the tree's files. Returns ``destination``."""
    package = destination / "nas"
    package.mkdir(parents=True)
    (package / "__init__.py").symlink_to(ROOT / "nas" / "__init__.py")
    for name in TYPED_PACKAGES:
        (package / name).symlink_to(ROOT / name, target_is_directory=True)
    return destination


def test_mypy_supernets_and_kernels(tmp_path: Path) -> None:
    tree = assemble_installed_layout(tmp_path / "tree")
    env = {**os.environ, "MYPYPATH": str(tree)}
    packages = [argument for name in TYPED_PACKAGES for argument in ("-p", f"nas.{name}")]
    arguments = ["mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "mypy"), *packages]
    status, output = run_tool(arguments, tree, env)
    assert status == 0, f"mypy {' '.join(packages)} reported errors:\n{output}"
