"""One validation path for archs from any source (``nas.supernets.arch_input``): exact types, unknown keys refused at
every level, every problem at once with its path, membership tested by the space's walk, canonical values."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nas.search.encoding import arch_from_params, params_from_arch
from nas.space.schema import parse_config
from nas.supernets.space import Arch, ArchError, Problem, SearchSpace, StageArch
from nas.supernets.supernet import Supernet
from tests.helpers import TINY_DIGITS_SPACE

SEQUENCE_SPACE = """
name: tiny_sequence
task: {dataset: mqar, input_shape: [32], num_classes: 16, vocab_size: 16, num_kv_pairs: 2, num_train: 64, num_val: 32, num_test: 32}
stem: {channels: 16, kernel_size: 1}
stages:
  - depth: [1, 2]
    width: [16, 24]
    blocks:
      - {type: gated_attention, num_heads: [1, 2], head_dim: 8, ffn: [glu, mlp], mlp_ratio: [1, 1.5], activation: gelu}
      - {type: gla, num_heads: 1, key_dim: [8, 16], value_dim: 8, ffn: glu, mlp_ratio: 2, activation: gelu}
sequence_length: [16, 32]
"""


@pytest.fixture(scope="module")
def image() -> SearchSpace:
    """The issue's space: width [8, 12], kernel_size [3, 5], squeeze_excite [false, true], resolution [6, 8]."""
    return parse_config(TINY_DIGITS_SPACE).space


@pytest.fixture(scope="module")
def sequence() -> SearchSpace:
    return parse_config(SEQUENCE_SPACE).space


def largest_data(space: SearchSpace) -> dict[str, Any]:
    """The largest arch as JSON reads it back (a fresh copy to break)."""
    return json.loads(space.largest().to_json())


def problems(data: Any, space: SearchSpace | None) -> dict[str, str]:
    """Path -> message of data that must be refused."""
    with pytest.raises(ArchError) as caught:
        Arch.from_dict(data, space)
    found = {problem.path: problem.message for problem in caught.value.problems}
    assert len(found) == len(caught.value.problems), "one problem per path"
    return found


def set_in(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


ISSUE_CASES = {
    "width 12.0": (("stages", 0, "width"), 12.0, "stages[0].width", "must be one of [8, 12], got 12.0 (a float; this field takes integers)"),
    "kernel_size 5.0": (
        ("stages", 0, "blocks", 0, "kernel_size"),
        5.0,
        "stages[0].blocks[0].kernel_size",
        "must be one of [3, 5], got 5.0 (a float; this field takes integers)",
    ),
    "squeeze_excite 1": (
        ("stages", 0, "blocks", 0, "squeeze_excite"),
        1,
        "stages[0].blocks[0].squeeze_excite",
        "must be one of [False, True], got 1 (an integer; this field takes true or false)",
    ),
    "resolution 8.0": (("resolution",), 8.0, "resolution", "must be one of [6, 8], got 8.0 (a float; this field takes integers)"),
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_the_issues_values_are_refused_with_their_path(image: SearchSpace, case: str) -> None:
    where, value, path, message = ISSUE_CASES[case]
    data = largest_data(image)
    set_in(where, value)(data)
    assert problems(data, image) == {path: message}
    # Without a space the type rule alone refuses them, with the messages of a space file.
    assert list(problems(data, None)) == [path]
    # The same value typed correctly is accepted, and the arch is the space's own.
    set_in(where, int(value))(data)
    data["stages"][0]["blocks"][0]["squeeze_excite"] = bool(data["stages"][0]["blocks"][0]["squeeze_excite"])
    arch = Arch.from_dict(data, image)
    image.check(arch)
    assert Arch.from_json(arch.to_json(), image) == arch


def test_every_problem_is_reported_at_once(image: SearchSpace) -> None:
    data = largest_data(image)
    for where, value, _, _ in ISSUE_CASES.values():
        set_in(where, value)(data)
    data["stages"][0]["blocks"][1]["activation"] = "rleu"
    data["stages"][0]["blocks"][1]["expand_ratio"] = 4
    with pytest.raises(ArchError) as caught:
        Arch.from_dict(data, image, source="arch.json")
    error = caught.value
    assert [problem.path for problem in error.problems] == [
        "resolution",
        "stages[0].width",
        "stages[0].blocks[0].kernel_size",
        "stages[0].blocks[0].squeeze_excite",
        "stages[0].blocks[1].expand_ratio",
        "stages[0].blocks[1].activation",
    ]
    text = str(error)
    assert text.startswith("arch.json: 6 problem(s)\n")
    assert "  - stages[0].blocks[1].activation: must be one of ['relu'], got 'rleu'; did you mean 'relu'?" in text
    assert "  - stages[0].blocks[1].expand_ratio: must be one of [2, 3], got 4" in text


def test_unknown_keys_are_refused_at_every_level_with_did_you_mean(image: SearchSpace) -> None:
    data = largest_data(image)
    data["resolutoin"] = 8
    data["stages"][0]["widht"] = 8
    data["stages"][0]["depth"] = 2
    data["stages"][0]["blocks"][1]["kernal_size"] = 3
    for space in (image, None):
        found = problems(data, space)
        assert found["resolutoin"] == "unknown key; allowed keys: ['resolution', 'sequence_length', 'stages']; did you mean 'resolution'?"
        assert found["stages[0].widht"] == "unknown key; allowed keys: ['width', 'blocks']; did you mean 'width'?"
        assert found["stages[0].depth"].startswith("unknown key (an arch's stage has no depth key: its depth is the number of blocks it lists)")
        assert found["stages[0].blocks[1].kernal_size"] == (
            "unknown field of 'mbconv'; its fields: ['kernel_size', 'expand_ratio', 'activation', 'squeeze_excite']; did you mean 'kernel_size'?"
        )
        assert len(found) == 4


def test_structure_problems_are_named_and_never_a_traceback(image: SearchSpace) -> None:
    cases: dict[str, tuple[Any, dict[str, str]]] = {
        "not a mapping": ([1, 2], {"": "an arch must be a mapping with keys ['resolution', 'sequence_length', 'stages'], got a list: [1, 2]"}),
        "no stages": ({"resolution": 8}, {"stages": "is required: a list of stages, each a mapping with 'width' and 'blocks'"}),
        "stages not a list": ({"resolution": 8, "stages": {"width": 8}}, {"stages": "must be a list of stages, got a mapping: {'width': 8}"}),
        "stage not a mapping": ({"resolution": 8, "stages": [3]}, {"stages[0]": "must be a mapping with keys ['width', 'blocks'], got an integer: 3"}),
        "block without type": (
            {"resolution": 8, "stages": [{"width": 8, "blocks": [{"kernel_size": 3}]}]},
            {"stages[0].blocks[0].type": "is required: one of ['mbconv']"},
        ),
        "unknown block type": (
            {"resolution": 8, "stages": [{"width": 8, "blocks": [{"type": "mbcov"}]}]},
            {"stages[0].blocks[0].type": "must be one of ['mbconv'], got 'mbcov'; did you mean 'mbconv'?"},
        ),
    }
    for name, (data, expected) in cases.items():
        assert problems(data, image) == expected, name
    missing = largest_data(image)
    del missing["stages"][0]["blocks"][0]["expand_ratio"]
    del missing["resolution"]
    assert problems(missing, image) == {"resolution": "is required: one of [6, 8]", "stages[0].blocks[0].expand_ratio": "is required: one of [2, 3]"}
    extra_stage = largest_data(image)
    extra_stage["stages"].append(copy.deepcopy(extra_stage["stages"][0]))
    assert problems(extra_stage, image) == {"stages": "must list 1 stage(s), as the space 'tiny' has, got 2"}
    deep = largest_data(image)
    deep["stages"][0]["blocks"].append(copy.deepcopy(deep["stages"][0]["blocks"][0]))
    assert problems(deep, image) == {"stages[0].depth": "must be one of [1, 2], got 3 (the number of blocks listed)"}
    wrong_size = largest_data(image)
    wrong_size["sequence_length"] = 32
    assert "sequence_length" in problems(wrong_size, image)


def test_number_fields_take_int_or_float_and_read_back_as_the_spaces_choice(sequence: SearchSpace) -> None:
    """``mlp_ratio`` (a FloatRule) has choices [1, 1.5]: ``1.0`` is the choice ``1``, written back as ``1``."""
    arch = sequence.smallest("gated_attention")
    data = json.loads(arch.to_json())
    assert data["stages"][0]["blocks"][0]["mlp_ratio"] == 1
    data["stages"][0]["blocks"][0]["mlp_ratio"] = 1.0
    parsed = Arch.from_dict(data, sequence)
    assert parsed.to_json() == arch.to_json() and parsed.digest() == arch.digest()
    assert type(parsed.stages[0].blocks[0].mlp_ratio) is int
    data["stages"][0]["blocks"][0]["mlp_ratio"] = True
    assert problems(data, sequence) == {"stages[0].blocks[0].mlp_ratio": "must be one of [1, 1.5], got True (a boolean; this field takes numbers)"}


def test_other_fields_and_a_sequence_space_follow_the_same_rules(sequence: SearchSpace) -> None:
    data = json.loads(sequence.largest("gla").to_json())
    data["sequence_length"] = 32.0
    data["stages"][0]["blocks"][0]["key_dim"] = True
    data["stages"][0]["blocks"][1]["ffn"] = 1
    data["stages"][0]["blocks"][1]["num_heads"] = "1"
    data["resolution"] = 8
    assert problems(data, sequence) == {
        "resolution": "applies to image archs; the space 'tiny_sequence' is a sequence space, its archs have sequence_length",
        "sequence_length": "must be one of [16, 32], got 32.0 (a float; this field takes integers)",
        "stages[0].blocks[0].key_dim": "must be one of [8, 16], got True (a boolean; this field takes integers)",
        "stages[0].blocks[1].num_heads": "must be one of [1], got '1' (a string; this field takes integers)",
        "stages[0].blocks[1].ffn": "must be one of ['glu'], got 1 (an integer; this field takes names (strings))",
    }


def test_check_refuses_python_built_archs_with_every_problem(image: SearchSpace) -> None:
    """An ``Arch`` built in Python (dataclasses do not check types) goes through the same rules: ``SearchSpace.check``,
    and ``Supernet.set_active`` before any slicing (no ``TypeError: slice indices must be integers``)."""
    good = image.largest()
    stage = good.stages[0]
    bad = Arch(
        (StageArch(12.0, (dataclasses.replace(stage.blocks[0], kernel_size=5.0, squeeze_excite=1), stage.blocks[1])),),
        resolution=8.0,
    )
    assert bad == good, "Python's == cannot tell them apart: the reason a membership test must look at types"
    with pytest.raises(ArchError) as caught:
        image.check(bad)
    assert {problem.path for problem in caught.value.problems} == {path for _, _, path, _ in ISSUE_CASES.values()}
    supernet = Supernet(image)
    with pytest.raises(ArchError, match=r"stages\[0\]\.width: must be one of \[8, 12\], got 12.0 \(a float"):
        supernet.set_active(bad)
    with pytest.raises(ArchError):
        image.walk().values(bad)
    with pytest.raises(ArchError):
        params_from_arch(image, bad)
    assert image.canonical(good) == good


def test_study_params_are_checked_by_type(image: SearchSpace) -> None:
    params = params_from_arch(image, image.largest())
    assert arch_from_params(image, params) == image.largest()
    with pytest.raises(ArchError, match=r"stages\[0\]\.blocks\[0\]\.kernel_size: must be one of \[3, 5\], got 5.0 \(a float"):
        arch_from_params(image, {**params, "s0.b0.mbconv.kernel_size": 5.0})
    with pytest.raises(ArchError, match=r"squeeze_excite: must be one of \[False, True\], got 1 \(an integer"):
        arch_from_params(image, {**params, "s0.b0.mbconv.squeeze_excite": 1})


def test_json_text_is_strict(image: SearchSpace) -> None:
    text = image.largest().to_json()
    with pytest.raises(ArchError, match="--arch: not valid JSON"):
        Arch.from_json(text[:-1], image, source="--arch")
    with pytest.raises(ArchError, match="NaN is not a JSON number"):
        Arch.from_json(text.replace('"resolution": 8', '"resolution": NaN'), image)
    assert Arch.from_json(text, image) == image.largest()


def test_onnx_metadata_is_read_back_through_the_same_path(image: SearchSpace, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from nas.export.onnx import read_arch

    def model_with(arch_json: str | None, path: Path) -> Path:
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph)
        if arch_json is not None:
            helper.set_model_props(model, {"nasforge_arch": arch_json})
        onnx.save(model, str(path))
        return path

    arch = image.smallest()
    assert read_arch(model_with(arch.to_json(), tmp_path / "good.onnx"), image) == arch
    assert read_arch(tmp_path / "good.onnx") == arch
    tampered = arch.to_json().replace('"resolution": 6', '"resolution": 6.0').replace('"width": 8', '"width": 8.0')
    with pytest.raises(ArchError) as caught:
        read_arch(model_with(tampered, tmp_path / "tampered.onnx"), image)
    assert [problem.path for problem in caught.value.problems] == ["resolution", "stages[0].width"]
    assert str(caught.value).startswith(f"{tmp_path / 'tampered.onnx'} (nasforge_arch metadata): 2 problem(s)")
    with pytest.raises(ArchError, match="has no 'nasforge_arch' metadata"):
        read_arch(model_with(None, tmp_path / "plain.onnx"), image)
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(ArchError, match="not a readable ONNX model"):
        read_arch(tmp_path / "garbage.onnx", image)


def test_arch_error_keeps_its_problems_through_pickle() -> None:
    """Ray sends exceptions between processes by pickling them."""
    error = ArchError([Problem("resolution", "must be one of [6, 8], got 7"), Problem("stages[0].width", "must be one of [8, 12], got 9")], "x.json")
    copy_of = pickle.loads(pickle.dumps(error))
    assert copy_of.problems == error.problems and str(copy_of) == str(error)
    assert str(ArchError("plain message")) == "plain message"
