"""The search-space file as a Python API: every mistake at once, no exception but ``ConfigError``, frozen values."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from nas.space.schema import ConfigError, builtin_spaces, load_config, parse_config
from nas.supernets.space import Arch, SearchSpace, StageArch
from tests.helpers import TINY_DIGITS_SPACE

VALID = TINY_DIGITS_SPACE + "training: {epochs: 2, batch_size: 64, lr: 0.01}\n"

TINY_MIXED = """
name: tiny_mixed
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, stride: 1}
stages:
  - depth: [1, 2]
    width: [8, 12]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5], expand_ratio: [1, 2], activation: relu, squeeze_excite: false}
      - {type: gated_attention, num_heads: [1, 2], head_dim: 8, ffn: glu, mlp_ratio: 2, activation: gelu}
  - depth: [1, 3]
    width: 16
    blocks:
      - {type: mbconv, kernel_size: 3, expand_ratio: [2, 4], activation: [relu, silu], squeeze_excite: false}
resolution: [6, 8]
"""


def problems_of(text: str) -> dict[str, str]:
    """Path -> message (messages of one path joined) of a text that must fail."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    found: dict[str, str] = {}
    for problem in caught.value.problems:
        found[problem.path] = f"{found[problem.path]} | {problem.message}" if problem.path in found else problem.message
    return found


def with_changes(text: str, change) -> str:
    data = yaml.safe_load(text)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def test_valid_text_parses() -> None:
    config = parse_config(VALID)
    assert config.space.name == "tiny" and config.space.resolutions == (6, 8)
    assert config.space.count() == 2 * (2 * 8 + 2 * 8**2)


@pytest.mark.parametrize("name", sorted(builtin_spaces()))
def test_every_builtin_space_loads(name: str) -> None:
    config = load_config(name)
    assert config.space.name == name and config.space.count() >= 1


def test_one_run_reports_every_problem_with_path_value_and_rule() -> None:
    text = """
name: many
task: {dataset: digitz, input_shape: [1, 24, 24], num_classes: 10}
stem: {channels: 16, stride: 1, activation: reluu}
stagse: []
stages:
  - depth: 0
    width: -8
    blocks:
      - {type: mbconv, kernel_size: [3, 4], expand_ration: 2, activation: relu, squeeze_excite: false}
      - {type: mbcov, kernel_size: 3}
  - depth: true
    width: [32, 32]
    blocks:
      - {type: mbconv, kernel_size: [3, 3], expand_ratio: 1000000000000000000000000000000, activation: relu, squeeze_excite: false}
resolution: [24, 48]
training: {optimizer: adam, lr: .nan, epochs: ten}
search: {constraints: {parms: 1000}}
"""
    found = problems_of(text)
    expected = {
        "stagse": ["unknown key", "did you mean 'stages'"],
        "task.dataset": ["'digitz'", "did you mean 'digits'", "'mnist'"],
        "stem.activation": ["'reluu'", "did you mean 'relu'"],
        "stages[0].depth": ["greater than or equal to 1", "got 0"],
        "stages[0].width": ["greater than or equal to 1", "got -8"],
        "stages[0].blocks[0].kernel_size[1]": ["odd", "got 4"],
        "stages[0].blocks[0].expand_ration": ["unknown field", "did you mean 'expand_ratio'"],
        "stages[0].blocks[0].expand_ratio": ["is required"],
        "stages[0].blocks[1].type": ["'mbcov'", "did you mean 'mbconv'", "'gla'"],
        "stages[1].depth": ["integer", "got True"],
        "stages[1].width": ["distinct", "[32, 32]"],
        "stages[1].blocks[0].kernel_size": ["distinct", "[3, 3]"],
        "stages[1].blocks[0].expand_ratio": ["between 1 and 12", "got 1000000000000000000000000000000"],
        "resolution[1]": ["at most", "24", "got 48"],
        "training.optimizer": ["'adam'", "did you mean 'adamw'"],
        "training.lr": ["greater than 0", "nan"],
        "training.epochs": ["integer", "'ten'"],
        "search.constraints.parms": ["unknown key", "allowed keys: ['latency_ms', 'macs', 'params']", "did you mean 'params'"],
    }
    assert set(found) == set(expected), found
    for path, parts in expected.items():
        for part in parts:
            assert part in found[path], (path, found[path])


def test_problems_are_listed_in_file_order_and_in_the_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_changes(VALID, lambda d: (d.update(stagse=1, resolution=[6, 99]), d["task"].update(dataset="digitz"))))
    paths = [problem.path for problem in caught.value.problems]
    assert paths == ["stagse", "task.dataset", "resolution[1]"]
    assert str(caught.value).startswith("<string>: 3 problem(s)")
    assert all(f"  - {problem}" in str(caught.value) for problem in caught.value.problems)


def test_block_modality_is_checked_and_unknown_dataset_still_checks_its_blocks() -> None:
    gla = {"type": "gla", "num_heads": 1, "key_dim": 16, "value_dim": 16, "ffn": "glu", "mlp_ratio": 2, "activation": "gelu"}
    found = problems_of(with_changes(VALID, lambda d: d["stages"][0]["blocks"].append(gla)))
    assert "['sequence']" in found["stages[0].blocks[1].type"] and "image" in found["stages[0].blocks[1].type"]
    found = problems_of(with_changes(VALID, lambda d: (d["stages"][0]["blocks"].append(gla), d["task"].update(dataset="digitz"))))
    assert set(found) == {"task.dataset", "stages[0].blocks[1].type"}


@pytest.mark.parametrize(
    ("change", "path", "needle"),
    [
        (lambda d: d["stages"][0].update(depth=True), "stages[0].depth", "got True"),
        (lambda d: d["stages"][0].update(depth=[1, True]), "stages[0].depth[1]", "got True"),
        (lambda d: d["stem"].update(channels=True), "stem.channels", "got True"),
        (lambda d: d["stages"][0]["blocks"][0].update(kernel_size=True), "stages[0].blocks[0].kernel_size", "integer"),
        (lambda d: d["stages"][0]["blocks"][0].update(expand_ratio=[2, True]), "stages[0].blocks[0].expand_ratio[1]", "number"),
        (lambda d: d["stages"][0]["blocks"][0].update(squeeze_excite=[False, 0]), "stages[0].blocks[0].squeeze_excite[1]", "true or false"),
        (lambda d: d["training"].update(seed=False), "training.seed", "got False"),
        (lambda d: d["stages"][0].update(depth=None), "stages[0].depth", "got None"),
        (lambda d: d.update(stem=None), "stem", "got None"),
        (lambda d: d["stages"][0].update(blocks=None), "stages[0].blocks", "got None"),
        (lambda d: d["stages"][0]["blocks"][0].update(type=None), "stages[0].blocks[0].type", "got None"),
        (lambda d: d["stages"][0]["blocks"][0].update(kernel_size=None), "stages[0].blocks[0].kernel_size", "got None"),
        (lambda d: d["stages"][0]["blocks"][0].update(type=["mbconv"]), "stages[0].blocks[0].type", "got ['mbconv']"),
        (lambda d: d["stages"][0].update(depth=[]), "stages[0].depth", "at least 1"),
        (lambda d: d.update(resolution=[]), "resolution", "at least 1"),
        (lambda d: d["stages"][0]["blocks"][0].update(kernel_size=[]), "stages[0].blocks[0].kernel_size", "at least one"),
        (lambda d: d["stages"][0]["blocks"][0].update(expand_ratio=[2, 2.0]), "stages[0].blocks[0].expand_ratio", "distinct"),
        (lambda d: d["stages"][0].update(depth=65), "stages[0].depth", "64"),
        (lambda d: d["stages"][0].update(width=10**30), "stages[0].width", "16384"),
        (lambda d: d["head"].update(dropout=float("nan")), "head.dropout", "nan"),
        (lambda d: d["training"].update(lr=float("inf")), "training.lr", "inf"),
        (lambda d: d["stages"][0]["blocks"][0].update(expand_ratio=float("inf")), "stages[0].blocks[0].expand_ratio", "inf"),
        (lambda d: d["stages"][0]["blocks"][0].update(expand_ratio=float("nan")), "stages[0].blocks[0].expand_ratio", "nan"),
        (lambda d: d["task"].update(num_classes="10"), "task.num_classes", "'10'"),
        (lambda d: d["task"].update(input_shape=[1, 8]), "task.input_shape", "[channels, height, width]"),
        (lambda d: d.update(resolution=4, stem={"channels": 8, "stride": 4}), "resolution", "total stride 8"),
        (lambda d: d.pop("resolution"), "resolution", "is required"),
    ],
)
def test_single_mistake_is_reported_at_its_path(change, path: str, needle: str) -> None:
    found = problems_of(with_changes(VALID, change))
    assert path in found, found
    assert needle in found[path], found[path]


def test_booleans_are_never_integers() -> None:
    found = problems_of(VALID.replace("depth: [1, 2]", "depth: true"))
    assert list(found) == ["stages[0].depth"]


def test_union_mistakes_give_one_line_each() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_changes(VALID, lambda d: d["stages"][0].update(depth=0, width="wide")))
    assert [problem.path for problem in caught.value.problems] == ["stages[0].depth", "stages[0].width"]
    assert "list of choices" in caught.value.problems[1].message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("# only\n# comments\n", "empty"),
        ("- a\n- b\n", "got a list"),
        ("42\n", "got a number"),
        ("just a string\n", "got a string"),
        ("name: [1, 2\nstem: 3\n", "line 2"),
        ("a: 1\n\tb: 2\n", "line 2"),
        ("name: a\x00b\n", "U+0000"),
        ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
        ("a: " + "[" * 40 + "]" * 40, "nested more than"),
        ("a: 1" + "0" * 5000 + "\n", "invalid YAML"),
        ("a: !!python/object:os.system echo\n", "invalid YAML"),
        ("? [a, b]\n: 1\n", "invalid YAML"),
        ("name: x\n" + "#" * 1_000_001, "longer than"),
    ],
)
def test_broken_documents_give_one_clear_problem(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert len(caught.value.problems) == 1
    assert needle in str(caught.value)


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ["name: bomb", "task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}", "stem: {channels: 8}", "resolution: 8"]
    lines.append(f"l0: &l0 [{', '.join(['lol'] * width)}]")
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    top = f"*l{levels - 1}"
    lines.append(
        f"stages: [{{depth: 1, width: 8, blocks: [{{type: mbconv, kernel_size: {top}, expand_ratio: {top}, activation: {top}, squeeze_excite: {top}}}]}}]"
    )
    return "\n".join(lines) + "\n"


ISOLATED = """
import json, sys, time
from nas.space.schema import ConfigError, parse_config
for text in json.load(sys.stdin):
    start = time.monotonic()
    try:
        parse_config(text)
        outcome = "accepted"
    except ConfigError as error:
        outcome = str(error)
    print(json.dumps([outcome, time.monotonic() - start]), flush=True)
"""


def test_alias_bombs_and_cycles_are_rejected_quickly() -> None:
    """In a child process with a deadline: a regression here hangs and eats memory rather than failing."""
    cases = [
        (billion_laughs(), "aliases"),
        (f"s: &s {'x' * 200_000}\nt: [{', '.join(['*s'] * 20)}]\n", "characters once YAML aliases are expanded"),
        ("a: &a [*a]\n", "nested more than"),
        ("a: &a {b: *a}\n", "nested more than"),
        ("name: x\nstages: &s [{depth: 1, width: 8, blocks: *s}]\n", "nested more than"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", ISOLATED], check=False, input=json.dumps([text for text, _ in cases]), capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stderr
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outcomes) == len(cases)
    for (message, seconds), (_, needle) in zip(outcomes, cases, strict=False):
        assert needle in message and "1 problem(s)" in message, message
        assert seconds < 10


def test_small_aliases_are_fine() -> None:
    text = VALID.replace("      - {type: mbconv,", "      - &block {type: mbconv,") + "other: *block\n"
    assert list(problems_of(text)) == ["other"]
    anchored = VALID.replace("stages:\n  - depth: [1, 2]", "stages:\n  - depth: &depths [1, 2]")
    assert parse_config(anchored).space.stages[0].depths == (1, 2)


def test_too_many_problems_are_summarised_in_the_message() -> None:
    text = VALID.replace("kernel_size: [3, 5]", f"kernel_size: [{', '.join(str(2 * i) for i in range(1, 400))}]")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert len(caught.value.problems) > 300
    assert "more" in str(caught.value).splitlines()[-1] and len(str(caught.value).splitlines()) < 250


def test_absurdly_large_space_is_rejected_instead_of_overflowing() -> None:
    choices = ", ".join(str(1 + index / 8) for index in range(80))
    stage = {
        "depth": 64,
        "width": 8,
        "blocks": [
            {"type": "mbconv", "kernel_size": [3, 5, 7], "expand_ratio": yaml.safe_load(f"[{choices}]"), "activation": "relu", "squeeze_excite": [False, True]}
        ],
    }
    found = problems_of(with_changes(VALID, lambda d: d.update(stages=[stage] * 10, resolution=8, stem={"channels": 8, "stride": 1})))
    assert "subnets" in found[""]


def test_load_config_file_problems(tmp_path: Path) -> None:
    (tmp_path / "binary.yaml").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)) + b"\x00\xff")
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "big.yaml").write_text("name: x\n" + "#" * 1_100_000)
    (tmp_path / "folder.yaml").mkdir()
    cases = {
        "binary.yaml": "not UTF-8",
        "latin1.yaml": "not UTF-8",
        "big.yaml": "larger than",
        "folder.yaml": "directory",
        "missing.yaml": "no such file",
        "no/such/dir": "no such file",
    }
    for name, needle in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config(tmp_path / name)
        assert len(caught.value.problems) == 1 and needle in str(caught.value), (name, str(caught.value))
    with pytest.raises(ConfigError, match="did you mean 'digits_quick'"):
        load_config("digits_quik")
    for strange in ("a\x00b", "x" * 5000 + ".yaml", ""):
        with pytest.raises(ConfigError):
            load_config(strange)


VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    7,
    10**30,
    -(10**30),
    1.5,
    float("nan"),
    float("inf"),
    "",
    "x",
    "relu",
    "mbconv",
    "gla",
    "digits",
    "mqar",
    [],
    [1],
    [1, 1],
    [3, 5],
    ["a"],
    [[1]],
    {},
    {"a": 1},
    {"type": "mbconv"},
    [None],
    [{}],
]


def _paths(node: Any, prefix: tuple = ()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def mutate(data: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(data))[1:])
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        roll = rng.random()
        if roll < 0.3:
            del parent[key]
        elif roll < 0.8:
            parent[key] = copy.deepcopy(rng.choice(VALUES))
        elif roll < 0.9 and isinstance(parent, dict):
            parent[f"{key}x"] = parent.pop(key)
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        else:
            parent[key] = [parent[key], parent[key]]
    return data


def mutants(count: int, seed: int) -> list[str]:
    spaces = [yaml.safe_load(path.read_text()) for _, path in sorted(builtin_spaces().items())]
    rng = random.Random(seed)
    return [yaml.safe_dump(mutate(spaces[index % len(spaces)], rng), sort_keys=False) for index in range(count)]


def test_random_mutations_give_a_config_or_a_config_error() -> None:
    outcomes = {"valid": 0, "invalid": 0}
    for index, text in enumerate(mutants(200, seed=1234)):
        try:
            config = parse_config(text)
        except ConfigError as error:
            assert error.problems and all(isinstance(problem.message, str) and problem.message for problem in error.problems)
            outcomes["invalid"] += 1
            continue
        except Exception as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutant {index} raised {type(error).__name__}: {error}\n{text}")
        space = config.space
        assert space.count() >= 1
        for seed in range(3):
            space.check(space.sample(np.random.default_rng(seed)))
        space.check(space.largest())
        space.check(space.smallest())
        outcomes["valid"] += 1
    assert outcomes["valid"] >= 5 and outcomes["invalid"] >= 100, outcomes


def test_load_config_returns_frozen_values() -> None:
    config = load_config("digits_quick")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.space = config.space  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.space.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.space.stages[0].depths = (1,)  # type: ignore[misc]
    with pytest.raises(ValueError):
        config.task.dataset = "mnist"  # type: ignore[misc]
    with pytest.raises(ValueError):
        config.training.lr = 1.0  # type: ignore[misc]
    assert isinstance(config.task.input_shape, tuple)
    assert isinstance(config.space.stages, tuple) and isinstance(config.space.stages[0].blocks[0].fields, tuple)
    hash(config.space)
    arch = config.space.largest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.stages[0].blocks[0].kernel_size = 1  # type: ignore[misc]


def enumerate_archs(space: SearchSpace) -> set[Arch]:
    archs: set[Arch] = set()
    per_stage = []
    for stage in space.stages:
        configs = [config for choices in stage.blocks for config in choices.configs()]
        options = [StageArch(width, blocks) for width in stage.widths for depth in stage.depths for blocks in itertools.product(configs, repeat=depth)]
        per_stage.append(options)
    for size in space.input_sizes:
        for stages in itertools.product(*per_stage):
            archs.add(Arch(tuple(stages), resolution=size))
    return archs


def test_count_equals_brute_force_enumeration() -> None:
    space = parse_config(TINY_MIXED).space
    archs = enumerate_archs(space)
    assert space.count() == len(archs) == 2 * (2 * (6 + 6**2)) * (1 * (4 + 4**3))
    for arch in itertools.islice(archs, 0, None, 97):
        space.check(arch)


def test_sample_is_deterministic_per_seed_and_always_in_the_space() -> None:
    for name in ("digits_quick", "mqar_quick", "ofa_mbv3"):
        space = load_config(name).space
        samples = [space.sample(np.random.default_rng(seed)) for seed in range(60)]
        assert samples == [space.sample(np.random.default_rng(seed)) for seed in range(60)]
        for arch in samples:
            space.check(arch)
            assert Arch.from_dict(arch.to_dict()) == arch
        assert len(set(samples)) > 1 if space.count() > 1 else True


def test_sample_covers_the_tiny_space() -> None:
    space = parse_config(TINY_MIXED).space
    rng = np.random.default_rng(0)
    seen = {space.sample(rng) for _ in range(3000)}
    assert seen <= enumerate_archs(space)
    assert {len(arch.stages[0].blocks) for arch in seen} == {1, 2}
    assert {type(block).__name__ for arch in seen for block in arch.stages[0].blocks} == {"MBConvConfig", "GatedAttentionConfig"}
    assert {arch.resolution for arch in seen} == {6, 8}
