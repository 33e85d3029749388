"""The wheel: no top-level ``kernels`` package, every package folder of the tree shipped (the package list is derived,
never hand-written), built-in spaces found by name and blocks discovered from the installed files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


ROOTS = {
    "nas": "nas",
    "supernets": "nas/supernets",
    "kernels": "nas/kernels",
    "search_spaces": "nas/search_spaces",
    "hardware_profiles": "nas/hardware_profiles",
}


def build_wheel(source: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("nasforge-*.whl")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def tree_python_files(root: Path) -> set[str]:
    """Every tracked-looking .py file of the five package roots, as its path inside the wheel."""
    found = set()
    for folder, installed in ROOTS.items():
        for path in (root / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                found.add(f"{installed}/{path.relative_to(root / folder).as_posix()}")
    return found


def test_every_python_file_of_the_tree_is_in_the_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(tree_python_files(ROOT) - names)
    assert not missing, f"not shipped (a folder without __init__.py?): {missing}"


def test_a_new_block_module_and_kernel_folder_ship_with_no_other_file_edited(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", "dist"))
    (source / "kernels" / "identity_test").mkdir()
    (source / "kernels" / "identity_test" / "__init__.py").write_text("def identity(x):\n    return x\n")
    block = (ROOT / "examples" / "custom_block" / "conv_mixer.py").read_text().replace('"conv_mixer"', '"conv_mixer_shipped"')
    (source / "supernets" / "blocks" / "conv_mixer_shipped.py").write_text(block)
    path = build_wheel(source, tmp_path / "out")
    names = set(zipfile.ZipFile(path).namelist())
    assert {"nas/kernels/identity_test/__init__.py", "nas/supernets/blocks/conv_mixer_shipped.py"} <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(path), "-q"], check=True)
    script = "from nas.supernets.blocks import BLOCKS\nimport nas.kernels.identity_test\nprint(sorted(BLOCKS.names()))\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "conv_mixer_shipped" in result.stdout and "mbconv" in result.stdout


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
        "import importlib.util, nas, nas.space\n"
        f"assert nas.__file__.startswith({str(target)!r}), nas.__file__\n"
        "assert importlib.util.find_spec('kernels') is None\n"
        "config = nas.space.load_config('digits_quick')\n"
        "assert str(config.space.stages[0].blocks[0].type) == 'mbconv'\n"
        "import nas.kernels.gla, nas.supernets.blocks.gla\n"
        "print(sorted(nas.space.builtin_spaces()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "digits_quick" in result.stdout and "mqar_quick" in result.stdout


def test_every_shipped_hardware_profile_file_is_in_the_wheel(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"nas/hardware_profiles/{path.relative_to(ROOT / 'hardware_profiles').as_posix()}"
        for path in (ROOT / "hardware_profiles").rglob("*")
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md") and ".lock" not in path.name
    }
    assert any(name.endswith("/profile.json") for name in shipped), "the shipped profiles are found by device from the wheel"
    assert not shipped - names, f"not in the wheel: {sorted(shipped - names)}"
