"""The ``nas`` command on search spaces: validate, space info, space list; exit codes and no tracebacks."""

from __future__ import annotations

import copy
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from nas.cli import main
from nas.space.schema import ConfigError, builtin_spaces, load_config, parse_config
from nas.supernets.blocks import BLOCKS
from nas.supernets.space import Arch
from tests.helpers import TINY_DIGITS_SPACE

MANY_MISTAKES = """\
name: many_mistakes
task:
  dataset: digitz
  input_shape: [1, 24, 24]
  num_classes: ten
stem: {channels: 1000000000000000000000000000000, stride: 1}
stagse: []
stages:
  - depth: 0
    width: -8
    blocks:
      - type: mbconv
        kernel_size: [3, 4]
        expand_ration: 2
        activation: relu
        squeeze_excite: false
      - type: mbcov
        kernel_size: 3
  - depth: true
    width: [32, 32]
    blocks:
      - type: mbconv
        kernel_size: [3, 3]
        expand_ratio: [2, 2]
        activation: relu
        squeeze_excite: false
      - type: gla
        num_heads: 1
        key_dim: 16
        value_dim: 16
        ffn: glu
        mlp_ratio: 2
        activation: gelu
resolution: [16, 48]
training:
  optimizer: adam
"""

MANY_EXPECTED = {
    "stagse": ["unknown key", "'stages'", "did you mean 'stages'?"],
    "task.dataset": ["must be one of", "'image_folder'", "got 'digitz'", "did you mean 'digits'?"],
    "task.num_classes": ["integer", "got 'ten'"],
    "stem.channels": ["less than or equal to 8192", "got 1000000000000000000000000000000"],
    "stages[0].depth": ["greater than or equal to 1", "got 0"],
    "stages[0].width": ["greater than or equal to 1", "got -8"],
    "stages[0].blocks[0].kernel_size[1]": ["must be odd, got 4"],
    "stages[0].blocks[0].expand_ration": ["unknown field of 'mbconv'", "'expand_ratio'", "did you mean 'expand_ratio'?"],
    "stages[0].blocks[0].expand_ratio": ["is required"],
    "stages[0].blocks[1].type": [f"must be one of {list(BLOCKS.names())}, got 'mbcov'", "did you mean 'mbconv'?"],
    "stages[1].depth": ["integer", "got True"],
    "stages[1].width": ["distinct", "[32, 32]"],
    "stages[1].blocks[0].kernel_size": ["choices must be distinct, got [3, 3]"],
    "stages[1].blocks[0].expand_ratio": ["choices must be distinct, got [2, 2]"],
    "stages[1].blocks[1].type": ["'gla'", "['sequence']", "image"],
    "resolution[1]": ["at most", "24", "got 48"],
    "training.optimizer": ["must be one of ['adamw', 'sgd'], got 'adam'", "did you mean 'adamw'?"],
}


def run_nas(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def problem_lines(stderr: str) -> dict[str, str]:
    """``  - path: message`` lines of a ConfigError, path -> message."""
    lines = [line[4:] for line in stderr.splitlines() if line.startswith("  - ")]
    found: dict[str, str] = {}
    for line in lines:
        path, _, message = line.partition(": ")
        assert path not in found, f"two lines for {path}:\n{stderr}"
        found[path] = message
    return found


def parse_info(stdout: str) -> dict[str, Any]:
    subnets = re.search(r"^subnets\s+([\d,]+)\s+\(= (\d+)\)$", stdout, re.MULTILINE)
    params = re.search(r"^parameters\s+([\d,]+) \.\. ([\d,]+)$", stdout, re.MULTILINE)
    macs = re.search(r"^MACs\s+([\d,]+) \.\. ([\d,]+)", stdout, re.MULTILINE)
    assert subnets and params and macs, stdout

    def number(text):
        return int(text.replace(",", ""))

    assert number(subnets.group(1)) == int(subnets.group(2))
    _, _, arch_json = stdout.partition("sampled arch (seed ")
    return {
        "subnets": int(subnets.group(2)),
        "params": (number(params.group(1)), number(params.group(2))),
        "macs": (number(macs.group(1)), number(macs.group(2))),
        "arch": json.loads(arch_json.split("\n", 1)[1]),
    }


@pytest.mark.parametrize("name", sorted(builtin_spaces()))
def test_validate_every_builtin_space(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out, err = call(capsys, "validate", name)
    assert code == 0, err
    assert out.startswith(f"{name}: valid") and err == ""


def test_validate_reports_every_mistake_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(MANY_MISTAKES)
    result = run_nas("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: {len(MANY_EXPECTED)} problem(s)\n"), result.stderr
    found = problem_lines(result.stderr)
    assert set(found) == set(MANY_EXPECTED), result.stderr
    for where, parts in MANY_EXPECTED.items():
        for part in parts:
            assert part in found[where], (where, found[where])


def test_validate_lists_problems_in_file_order(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(MANY_MISTAKES)
    code, _, err = call(capsys, "validate", str(path))
    assert code == 2
    paths = list(problem_lines(err))
    assert paths.index("stagse") < paths.index("task.dataset") < paths.index("stem.channels") < paths.index("stages[0].depth")
    assert paths.index("stages[0].blocks[1].type") < paths.index("stages[1].depth") < paths.index("resolution[1]") < paths.index("training.optimizer")


VALID = TINY_DIGITS_SPACE

BOMB = (
    "l0: &l0 [3, 3, 3, 3, 3, 3, 3, 3, 3]\n"
    + "".join(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]\n" for level in range(1, 9))
    + VALID.replace("kernel_size: [3, 5]", "kernel_size: *l8")
)


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


ROBUSTNESS = {
    "empty": ("", "empty"),
    "comments": ("# nothing\n# here\n", "empty"),
    "top_level_list": ("- name: a\n- name: b\n", "top level must be a mapping"),
    "top_level_scalar": ("3.5\n", "top level must be a mapping"),
    "binary": (bytes(random.Random(1).randrange(256) for _ in range(2048)) + b"\x00\x00\xff", "not UTF-8"),
    "nul_in_utf8": ("name: tiny\x00\n", "U+0000"),
    "invalid_utf8": (b"name: tiny\nstem: {channels: \xc3\x28}\n", "not UTF-8"),
    "syntax": ("name: tiny\nstages:\n  - depth: [1, 2\n    width: 8\n", "line 4"),
    "tab_indent": ("name: tiny\n\tstem: 3\n", "line 2"),
    "huge_file": ("name: tiny\n" + "# padding\n" * 110_000, "larger than 1,000,000 bytes"),
    "deep_nesting": ("name: " + "[" * 30_000 + "]" * 30_000 + "\n", "nested too deeply"),
    "deep_mapping": ("name: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "nested more than"),
    "huge_integer_literal": ("name: tiny\nstem: {channels: 1" + "0" * 5000 + "}\n", "invalid YAML"),
    "python_tag": ("name: !!python/object/apply:os.system [echo hi]\n", "invalid YAML"),
    "inf": (VALID.replace("expand_ratio: [2, 3]", "expand_ratio: [2, .inf]"), "stages[0].blocks[0].expand_ratio[1]: must be between 1 and 12, got inf"),
    "nan": (VALID + "training: {lr: .nan}\n", "training.lr: must be greater than 0, got nan"),
    "bool_depth": (VALID.replace("depth: [1, 2]", "depth: true"), "stages[0].depth: must be a valid integer or a list of choices, got True"),
    "bool_in_list": (VALID.replace("width: [8, 12]", "width: [8, true]"), "stages[0].width[1]: must be a valid integer, got True"),
    "null_depth": (VALID.replace("depth: [1, 2]", "depth:"), "stages[0].depth: must be a valid integer or a list of choices, got None"),
    "null_field": (VALID.replace("activation: relu, squeeze_excite", "activation: null, squeeze_excite"), "stages[0].blocks[0].activation: must be one of"),
    "null_stages": (VALID.split("stages:")[0] + "stages:\nresolution: 8\n", "stages: must be a valid list, got None"),
}


@pytest.mark.parametrize("case", sorted(ROBUSTNESS))
def test_bad_files_give_one_clear_message(capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str) -> None:
    content, needle = ROBUSTNESS[case]
    start = time.monotonic()
    code, out, err = call(capsys, "validate", write(tmp_path, "space.yaml", content))
    assert time.monotonic() - start < 20
    assert code == 2 and out == ""
    assert "Traceback" not in err
    assert err.startswith("error: ") and ": 1 problem(s)\n" in err, err
    assert needle in err, err
    assert len(err) < 2000, err


@pytest.mark.parametrize(
    ("target", "needle"),
    [("missing.yaml", "no such file"), ("folder", "is a directory"), ("digits_quik", "did you mean 'digits_quick'?")],
)
def test_bad_targets_give_one_clear_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, needle: str
) -> None:
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    code, out, err = call(capsys, "validate", target)
    assert code == 2 and out == "" and "Traceback" not in err
    assert needle in err and ": 1 problem(s)\n" in err, err


def test_alias_bomb_does_not_hang_or_eat_memory(tmp_path: Path) -> None:
    import resource

    start = time.monotonic()
    result = run_nas("validate", write(tmp_path, "bomb.yaml", BOMB), timeout=60)
    assert time.monotonic() - start < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "aliases" in result.stderr
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 4 * 1024 * 1024, "a child used more than 4 GiB"


def _mutate(data: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    data = copy.deepcopy(data)
    values: list[Any] = [None, True, 0, -3, 10**30, 2.5, float("nan"), "", "mbconv", [], [1, 1], {}, {"type": "gla"}, [None]]
    nodes: list[tuple[Any, Any]] = []
    stack: list[Any] = [data]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for key in keys:
            nodes.append((node, key))
            stack.append(node[key])
    parent, key = rng.choice(nodes)
    if rng.random() < 0.3:
        del parent[key]
    else:
        parent[key] = copy.deepcopy(rng.choice(values))
    return data


def test_random_mutations_exit_2_without_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rng = random.Random(2024)
    base = yaml.safe_load(builtin_spaces()["digits_quick"].read_text())
    rejected = 0
    for index in range(100):
        text = yaml.safe_dump(_mutate(base, rng))
        try:
            parse_config(text)
            continue
        except ConfigError:
            pass
        code, out, err = call(capsys, "validate", write(tmp_path, f"mutant{index}.yaml", text))
        assert code == 2 and out == "" and "Traceback" not in err, err
        assert err.startswith("error: ") and "problem(s)" in err
        rejected += 1
        if rejected == 6:
            break
    assert rejected == 6


@pytest.fixture(scope="module")
def ofa_info() -> subprocess.CompletedProcess[str]:
    return run_nas("space", "info", "ofa_mbv3", timeout=300)


def test_space_info_ofa_counts_the_once_for_all_space(ofa_info: subprocess.CompletedProcess[str]) -> None:
    assert ofa_info.returncode == 0, ofa_info.stderr
    info = parse_info(ofa_info.stdout)
    assert info["subnets"] == 543966387314312146275 == 25 * 7371**5
    assert "543,966,387,314,312,146,275" in ofa_info.stdout
    assert info["params"][0] < info["params"][1] and info["macs"][0] < info["macs"][1]


def test_space_info_ofa_sampled_arch_is_in_the_space(ofa_info: subprocess.CompletedProcess[str]) -> None:
    arch = Arch.from_dict(parse_info(ofa_info.stdout)["arch"])
    load_config("ofa_mbv3").space.check(arch)


def test_space_info_mobilenet_v2_matches_torchvision(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, "space", "info", "mobilenet_v2")
    assert code == 0, err
    info = parse_info(out)
    assert info["subnets"] == 1
    assert info["params"] == (3_504_872, 3_504_872)
    assert "parameters     3,504,872 .. 3,504,872" in out
    assert info["macs"][0] == info["macs"][1]
    space = load_config("mobilenet_v2").space
    arch = Arch.from_dict(info["arch"])
    space.check(arch)
    assert arch == space.largest() == space.smallest()


def test_space_info_digits_quick_has_a_range(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = call(capsys, "space", "info", "digits_quick", "--seed", "7")
    assert code == 0, err
    info = parse_info(out)
    space = load_config("digits_quick").space
    assert info["subnets"] == space.count() > 1
    assert info["params"][0] < info["params"][1]
    assert info["macs"][0] < info["macs"][1]
    assert "sampled arch (seed 7):" in out
    arch = Arch.from_dict(info["arch"])
    space.check(arch)
    assert arch == space.sample(__import__("numpy").random.default_rng(7))


def test_space_list_and_names_work_from_any_directory(tmp_path: Path) -> None:
    listing = run_nas("space", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    listed = {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}
    assert listed == set(builtin_spaces()) >= {"digits_quick", "mobilenet_v2", "mqar_quick", "ofa_mbv3"}
    for line in listing.stdout.splitlines():
        assert Path(line.split(maxsplit=1)[1]).is_file(), line
    validate = run_nas("validate", "mqar_quick", cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr
    assert validate.stdout.startswith("mqar_quick: valid")


def test_command_line_mistakes_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["validate"])
    assert caught.value.code == 2
    with pytest.raises(SystemExit) as caught:
        main(["space", "infoo", "digits_quick"])
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly() -> None:
    """`nas space info X | head -3`: the closed pipe ends the command without a traceback."""
    process = subprocess.Popen([sys.executable, "-m", "nas.cli", "space", "info", "digits_quick"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
