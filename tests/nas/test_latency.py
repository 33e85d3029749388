"""Latency: targets, fingerprint, the interleaved protocol (run order, stopping rules), op-type profiles.

No test asserts an absolute or relative time: the machine is shared and noisy. Bounds on the protocol itself
(``max_seconds``) are checked with a wide margin.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime
import pytest
import torch

from nas.export.onnx import export_onnx, quantize_int8
from nas.latency import (
    INFERENCE_CPU_FLAGS,
    TARGETS,
    LatencyError,
    LatencyTarget,
    Measurement,
    OpTypeComparison,
    available_targets,
    compare_op_types,
    device_fingerprint,
    fingerprint_differences,
    fingerprint_key,
    float_op_kind,
    is_stable,
    measure_latency,
    op_type_profile,
    protocol,
    register_target,
    resolve_target,
    robust_cv,
)
from nas.report.writers import write_report
from nas.space.schema import ConfigError, load_config, parse_config
from nas.supernets.registry import DuplicateNameError
from nas.supernets.supernet import Supernet
from tests.helpers import TINY_DIGITS_SPACE

FAST = {"warmup": 2, "block": 5, "min_repeats": 10, "min_seconds": 0.0, "max_seconds": 1.0}


@dataclass(frozen=True)
class Models:
    digits_small: Path
    digits_small_int8: Path
    digits_large: Path
    digits_large_int8: Path
    tokens: Path
    tokens_int8: Path


def _export(space_name: str, label: str, folder: Path) -> tuple[Path, Path]:
    space = load_config(space_name).space
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    arch = space.largest() if label == "largest" else space.smallest()
    static = supernet.extract(arch).eval()
    if space.modality == "image":
        inputs = torch.randn(50, space.in_channels, arch.resolution, arch.resolution)
    else:
        inputs = torch.randint(0, space.in_channels, (34, arch.sequence_length))
    path = folder / f"{space_name}_{label}.onnx"
    export_onnx(static, inputs[:2], path, arch=arch, space_name=space.name)
    int8_path = folder / f"{space_name}_{label}.int8.onnx"
    quantize_int8(path, int8_path, calibration=inputs[2:], validation=inputs[2:10], min_agreement=0.0)
    return path, int8_path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """Random-init exports (latency does not depend on weight values): digits smallest / largest, mqar smallest."""
    folder = tmp_path_factory.mktemp("latency-models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            digits_small = _export("digits_quick", "smallest", folder)
            digits_large = _export("digits_quick", "largest", folder)
            tokens = _export("mqar_quick", "smallest", folder)
    finally:
        torch.set_num_threads(threads)
    return Models(*digits_small, *digits_large, *tokens)


def test_builtin_targets_and_model_kind() -> None:
    targets = dict(TARGETS.items())
    assert {"cpu_fp32", "cpu_int8", "cuda_fp32", "tensorrt_fp16"} <= set(targets)
    assert all(name == target.name for name, target in targets.items())
    assert targets["cpu_int8"].model_kind == "int8"
    assert targets["cpu_fp32"].model_kind == "fp32"
    assert targets["tensorrt_fp16"].model_kind == "fp32"
    assert {"cpu_fp32", "cpu_int8"} <= set(available_targets())
    target = resolve_target("cpu_int8", threads=2, batch_size=8)
    assert (target.provider, target.precision, target.threads, target.batch_size) == ("CPUExecutionProvider", "int8", 2, 8)


def test_resolving_an_unavailable_target_names_the_available_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert available_targets() == ["cpu_fp32", "cpu_int8"]
    with pytest.raises(LatencyError, match="CUDAExecutionProvider") as caught:
        resolve_target("cuda_fp32")
    assert "cpu_fp32" in str(caught.value) and "cpu_int8" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(LatencyError, match="TensorrtExecutionProvider"):
        resolve_target("tensorrt_fp16")


def test_unknown_target_and_bad_settings_raise() -> None:
    with pytest.raises(LatencyError, match="did you mean 'cpu_fp32'"):
        resolve_target("cpu_fp23")
    with pytest.raises(LatencyError, match="threads must be an integer >= 1, got 0"):
        resolve_target("cpu_fp32", threads=0)
    with pytest.raises(LatencyError, match="batch_size"):
        LatencyTarget("mine", "CPUExecutionProvider", "fp32", batch_size=-1)
    with pytest.raises(LatencyError, match="precision"):
        LatencyTarget("mine", "CPUExecutionProvider", "int4")  # type: ignore[arg-type]


def test_fingerprint_fields_and_key() -> None:
    target = resolve_target("cpu_fp32")
    fingerprint = device_fingerprint(target, input_shape=(1, 1, 16, 16), input_dtype="float32")
    for field in (
        "cpu_model",
        "cpu_flags",
        "logical_cores",
        "gpu",
        "onnxruntime_version",
        "provider",
        "precision",
        "threads",
        "batch_size",
        "input_shape",
        "input_dtype",
    ):
        assert field in fingerprint, field
    assert fingerprint["onnxruntime_version"] == onnxruntime.__version__
    assert fingerprint["cpu_model"]
    assert set(fingerprint["cpu_flags"]) <= set(INFERENCE_CPU_FLAGS)
    assert fingerprint["logical_cores"] >= 1
    assert (fingerprint["provider"], fingerprint["precision"], fingerprint["threads"]) == ("CPUExecutionProvider", "fp32", 1)
    assert fingerprint["input_shape"] == [1, 1, 16, 16]
    assert json.loads(json.dumps(fingerprint)) == fingerprint

    key = fingerprint_key(fingerprint)
    assert len(key) == 16 and int(key, 16) >= 0
    assert fingerprint_key(dict(reversed(list(fingerprint.items())))) == key
    assert fingerprint_key(json.loads(json.dumps(fingerprint))) == key
    two_threads = device_fingerprint(resolve_target("cpu_fp32", threads=2), input_shape=(1, 1, 16, 16), input_dtype="float32")
    int8 = device_fingerprint(resolve_target("cpu_int8"), input_shape=(1, 1, 16, 16), input_dtype="float32")
    batch = device_fingerprint(resolve_target("cpu_fp32", batch_size=4), input_shape=(4, 1, 16, 16), input_dtype="float32")
    assert len({key, fingerprint_key(two_threads), fingerprint_key(int8), fingerprint_key(batch)}) == 4
    with pytest.raises(LatencyError, match="provider"):
        fingerprint_key({name: value for name, value in fingerprint.items() if name != "provider"})


def test_robust_cv_and_stability_rule() -> None:
    assert robust_cv([2.0] * 10) == 0.0
    assert robust_cv([1.0, 1.0, 1.0, 100.0]) == 0.0
    samples = np.random.default_rng(0).normal(10.0, 1.0, 20001)
    assert robust_cv(samples) == pytest.approx(0.1, rel=0.05)
    assert is_stable([1.0] * 20, min_repeats=20, rel_tolerance=0.02)
    assert not is_stable([1.0] * 19, min_repeats=20, rel_tolerance=0.02)
    assert not is_stable([1.0] * 10 + [1.1] * 10, min_repeats=20, rel_tolerance=0.02)
    assert is_stable([1.0] * 10 + [1.01] * 10, min_repeats=20, rel_tolerance=0.02)


def check_measurement(measurement: Measurement, min_repeats: int) -> None:
    assert 0 < measurement.p10_ms <= measurement.median_ms <= measurement.p90_ms
    assert measurement.samples >= min_repeats
    assert measurement.cv >= 0
    assert measurement.seconds > 0


def test_measure_latency_fp32_paths_and_bytes(models: Models) -> None:
    target = resolve_target("cpu_fp32")
    results = measure_latency(
        {"small": models.digits_small, "large": str(models.digits_large), "bytes": models.digits_small.read_bytes()},
        target,
        **FAST,
    )
    assert list(results) == ["small", "large", "bytes"]
    for measurement in results.values():
        check_measurement(measurement, FAST["min_repeats"])
        assert measurement.fingerprint["provider"] == "CPUExecutionProvider"
        assert measurement.fingerprint["precision"] == "fp32"
        assert measurement.fingerprint["input_dtype"] == "float32"
        assert measurement.fingerprint["quantization"] is None
    assert results["small"].fingerprint["input_shape"] == [1, 1, 12, 12]
    assert results["large"].fingerprint["input_shape"] == [1, 1, 16, 16]


def test_measure_latency_int8_tokens_and_batch(models: Models) -> None:
    target = resolve_target("cpu_int8", batch_size=3)
    results = measure_latency({"image": models.digits_small_int8, "tokens": models.tokens_int8.read_bytes()}, target, **FAST)
    for measurement in results.values():
        check_measurement(measurement, FAST["min_repeats"])
        assert measurement.fingerprint["precision"] == "int8"
        assert measurement.fingerprint["quantization"]["format"] == "QDQ"
    assert results["tokens"].fingerprint["input_shape"] == [3, 64]
    assert results["tokens"].fingerprint["input_dtype"] == "int64"
    assert results["image"].fingerprint["input_shape"] == [3, 1, 12, 12]
    assert fingerprint_key(results["image"].fingerprint) != fingerprint_key(results["tokens"].fingerprint)


def test_a_target_per_model_measures_fp32_and_int8_in_one_interleaved_call(models: Models) -> None:
    fp32, int8 = resolve_target("cpu_fp32"), resolve_target("cpu_int8")
    blocks: list[str] = []
    results = measure_latency(
        {"fp32": models.digits_small, "int8": models.digits_small_int8},
        {"fp32": fp32, "int8": int8},
        progress=lambda key, count, seconds: blocks.append(key),
        **FAST,
    )
    assert results["fp32"].fingerprint["precision"] == "fp32" and results["fp32"].fingerprint["quantization"] is None
    assert results["int8"].fingerprint["precision"] == "int8" and results["int8"].fingerprint["quantization"]["format"] == "QDQ"
    assert blocks[:2] in (["fp32", "int8"], ["int8", "fp32"]) and len(set(blocks)) == 2
    with pytest.raises(LatencyError, match="no target given"):
        measure_latency({"fp32": models.digits_small, "int8": models.digits_small_int8}, {"fp32": fp32}, **FAST)
    with pytest.raises(LatencyError, match="INT8|int8"):
        measure_latency({"x": models.digits_small_int8}, {"x": fp32}, **FAST)


def test_measurement_round_trips_through_json(models: Models) -> None:
    measurement = measure_latency({"a": models.digits_small}, resolve_target("cpu_fp32"), **FAST)["a"]
    restored = Measurement.from_dict(json.loads(json.dumps(measurement.to_dict())))
    assert restored == measurement
    with pytest.raises(LatencyError, match="unknown keys"):
        Measurement.from_dict({**measurement.to_dict(), "mean_ms": 1.0})


def test_max_seconds_stops_unstable_candidates(models: Models) -> None:
    cap = 0.5
    started = time.perf_counter()
    results = measure_latency(
        {"small": models.digits_small, "large": models.digits_large},
        resolve_target("cpu_fp32"),
        warmup=1,
        block=5,
        min_repeats=10**6,
        max_repeats=10**6,
        min_seconds=0.0,
        max_seconds=cap,
    )
    elapsed = time.perf_counter() - started
    assert elapsed <= 5 * cap
    for measurement in results.values():
        assert not measurement.stable
        assert measurement.samples >= 5
        assert 0 < measurement.p10_ms <= measurement.median_ms <= measurement.p90_ms


def test_no_model_is_stable_before_min_seconds(models: Models) -> None:
    last_report: dict[str, float] = {}
    results = measure_latency(
        {"small": models.digits_small, "large": models.digits_large},
        resolve_target("cpu_fp32"),
        warmup=1,
        min_repeats=5,
        rel_tolerance=10.0,
        min_seconds=0.3,
        max_seconds=3.0,
        progress=lambda key, samples, seconds: last_report.__setitem__(key, seconds),
    )
    for key, measurement in results.items():
        assert measurement.stable
        assert last_report[key] >= 0.3


def test_candidates_are_interleaved_in_rotating_blocks(models: Models) -> None:
    keys = ["a", "b", "c"]
    order: list[str] = []
    results = measure_latency(
        {key: models.digits_small for key in keys},
        resolve_target("cpu_fp32"),
        warmup=1,
        block=4,
        min_repeats=24,
        max_repeats=24,
        max_seconds=60.0,
        progress=lambda key, samples, seconds: order.append(key),
    )
    rounds = 24 // 4
    assert order == [key for index in range(rounds) for key in keys[index % 3 :] + keys[: index % 3]]
    assert all(measurement.samples == 24 for measurement in results.values())


def test_fingerprint_differences_name_each_field_that_the_key_hashes() -> None:
    fingerprint = device_fingerprint(resolve_target("cpu_fp32"), input_shape=(1, 1, 16, 16), input_dtype="float32")
    assert fingerprint_differences(fingerprint, dict(fingerprint)) == {}
    renamed = {**fingerprint, "target": "my_cpu", "cpu_flags": list(reversed(fingerprint["cpu_flags"]))}
    assert fingerprint_differences(fingerprint, renamed) == {}, "the target's name and the flags' order are not keyed"
    other = {**fingerprint, "cpu_model": "Other CPU", "threads": 4, "precision": "int8"}
    differences = fingerprint_differences(fingerprint, other)
    assert differences == {
        "cpu_model": (fingerprint["cpu_model"], "Other CPU"),
        "threads": (1, 4),
        "precision": ("fp32", "int8"),
    }
    assert (fingerprint_key(fingerprint) == fingerprint_key(other)) == (not differences)
    gpu = {**fingerprint, "provider": "CUDAExecutionProvider", "gpu": "GPU A"}
    assert set(fingerprint_differences(gpu, {**gpu, "gpu": "GPU B"})) == {"gpu"}
    assert fingerprint_differences(fingerprint, {**fingerprint, "gpu": "GPU B"}) == {}, "CPU figures ignore the GPU"
    with pytest.raises(LatencyError, match="lacks the field"):
        fingerprint_differences(fingerprint, {"cpu_model": "x"})


def test_a_plugin_registers_its_own_target_and_uses_it_like_a_built_in_one() -> None:
    from nas.search.settings import SearchSettings

    name = "cpu_fp32_two_threads"
    register_target(LatencyTarget(name, "CPUExecutionProvider", "fp32", threads=2), description="a user's target")
    try:
        assert TARGETS.entry(name).source == __name__
        assert TARGETS.metadata(name)["description"] == "a user's target"
        with pytest.raises(DuplicateNameError, match="already registered"):
            register_target(LatencyTarget(name, "CPUExecutionProvider", "fp32"))
        with pytest.raises(DuplicateNameError, match=r"'cpu_fp32' is already registered \(by nas.latency.targets\)"):
            register_target(LatencyTarget("cpu_fp32", "CPUExecutionProvider", "fp32", threads=8))
        assert name in available_targets()
        assert resolve_target(name).threads == 2
        assert resolve_target(name, threads=3, batch_size=2) == LatencyTarget(name, "CPUExecutionProvider", "fp32", 3, 2)
        text = TINY_DIGITS_SPACE + f"search: {{targets: [{name}, cpu_int8], constraints: {{latency_ms: {{{name}: 5.0}}}}}}\n"
        config = parse_config(text)
        assert config.search.targets == [name, "cpu_int8"]
        assert SearchSettings.from_config(config.search).targets == (name, "cpu_int8")
    finally:
        TARGETS.unregister(name)
    with pytest.raises(ConfigError, match=f"search.targets\\[0\\]: must be one of .*, got '{name}'"):
        parse_config(text)


def test_a_target_registered_by_a_plugin_named_in_the_space_file(tmp_path: Path) -> None:
    name = "cpu_int8_four_threads"
    (tmp_path / "my_target.py").write_text(
        f"from nas.latency import CPU_PROVIDER, LatencyTarget, register_target\n\nregister_target(LatencyTarget({name!r}, CPU_PROVIDER, 'int8', threads=4))\n"
    )
    space_file = tmp_path / "space.yaml"
    space_file.write_text("plugins: [my_target.py]\n" + TINY_DIGITS_SPACE + f"search: {{targets: [cpu_fp32, {name}]}}\n")
    try:
        config = load_config(str(space_file))
        assert config.search.targets == ["cpu_fp32", name]
        assert resolve_target(name) == LatencyTarget(name, "CPUExecutionProvider", "int8", threads=4)
        assert TARGETS.entry(name).source != "nas.latency.targets"
    finally:
        TARGETS.unregister(name)


def test_the_schema_checks_targets_against_the_registry() -> None:
    text = TINY_DIGITS_SPACE + "search: {targets: [cpu_fp32, cpu_fp33], constraints: {latency_ms: {cpu_in8: 1.0}}}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    names = list(TARGETS.names())
    assert {str(problem) for problem in caught.value.problems} == {
        f"search.targets[1]: must be one of {names}, got 'cpu_fp33'; did you mean 'cpu_fp32'?",
        f"search.constraints.latency_ms.cpu_in8: must be one of {names}, got 'cpu_in8'; did you mean 'cpu_int8'?",
    }


def _study_with_cpu_flags(flags: list[str] | None) -> Any:
    """An in-memory study of one trial whose fp32 and INT8 measurements carry a fingerprint with ``flags``."""
    import optuna

    from nas.search.settings import latency_key

    measurements = {}
    for name, precision in (("cpu_fp32", "fp32"), ("cpu_int8", "int8")):
        fingerprint: dict[str, Any] = {
            "cpu_model": "Measured CPU",
            "provider": "CPUExecutionProvider",
            "precision": precision,
            "threads": 1,
            "batch_size": 1,
            "onnxruntime_version": onnxruntime.__version__,
            "target": name,
        }
        if flags is not None:
            fingerprint["cpu_flags"] = flags
        measurements[latency_key(name)] = {"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.2, "cv": 0.05, "fingerprint": fingerprint}
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0, 0.8], user_attrs=measurements))
    return study


@pytest.mark.parametrize(
    ("flags", "machine_has_vnni", "expected"),
    [
        (["avx2", "avx512f", "avx512_vnni"], False, "Measured CPU has 8-bit dot-product instructions (avx512_vnni)"),
        (["avx2", "fma"], True, "Measured CPU has no 8-bit dot-product instructions (VNNI / AMX)"),
        (None, True, "its fingerprint records no CPU flags"),
    ],
)
def test_report_states_the_int8_instructions_of_the_measured_cpu_not_of_this_machine(
    flags: list[str] | None, machine_has_vnni: bool, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from nas.export import onnx as export_onnx_module
    from nas.latency import fingerprint as fingerprint_module

    here = ["avx2", "avx512_vnni", "amx_int8"] if machine_has_vnni else ["avx2"]
    monkeypatch.setattr(export_onnx_module, "cpu_has_vnni", lambda: machine_has_vnni)
    monkeypatch.setattr(fingerprint_module, "cpu_description", lambda: ("This machine's CPU", tuple(here)))
    targets = ["cpu_fp32", "cpu_int8"]
    summary = {
        "settings": {"targets": targets, "sampler": "random", "seed": 0, "batch_size": 1},
        "study": "search/study.journal",
        "constraints": [],
        "distinct_trials": 1,
        "fronts": {name: {"hypervolume": 0.0, "hypervolume_reference": {"latency_ms": 1.1}, "members": []} for name in targets},
    }
    op_types = [OpTypeComparison("Conv (dense)", 10.0, 5.0, 2.0), OpTypeComparison("Quantize/Dequantize", 0.0, 1.0, 0.0)]
    path = tmp_path / "report.md"
    write_report(_study_with_cpu_flags(flags), summary, path, op_types=op_types, space_name="tiny", elapsed={})
    report = path.read_text()
    assert expected in report
    assert "This machine's CPU" not in report


class FakeInput:
    name = "input"
    shape: ClassVar[list[Any]] = ["batch", 1, 4, 4]
    type = "tensor(float)"


class FakeOutput:
    name = "logits"


class FakeSession:
    """Records every run as its model's key."""

    def __init__(self, key: str, log: list[str]) -> None:
        self.key, self.log = key, log

    def get_inputs(self) -> list[Any]:
        return [FakeInput()]

    def get_outputs(self) -> list[Any]:
        return [FakeOutput()]

    def get_modelmeta(self) -> Any:
        return type("Meta", (), {"custom_metadata_map": {}})()

    def run(self, output_names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert output_names == ["logits"] and feed["input"].shape == (2, 1, 4, 4)
        self.log.append(self.key)
        return [np.zeros((2, 10), np.float32)]


def test_run_order_warmup_then_rewarm_and_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    monkeypatch.setattr(protocol, "is_stable", lambda samples, *, min_repeats, rel_tolerance: len(samples) >= min_repeats)
    monkeypatch.setattr(protocol, "create_session", lambda model, target, options, what: FakeSession(model.decode(), log))
    results = measure_latency(
        {"A": b"A", "B": b"B"},
        resolve_target("cpu_fp32", batch_size=2),
        warmup=3,
        block=2,
        rewarm=1,
        min_repeats=4,
        min_seconds=0.0,
        max_seconds=60.0,
    )
    per_block = ["A"] * 3 + ["B"] * 3
    assert log == ["A"] * 3 + ["B"] * 3 + per_block + per_block[::-1]
    assert all(measurement.stable and measurement.samples == 4 for measurement in results.values())


def test_user_errors_raise_latency_error(models: Models, tmp_path: Path) -> None:
    target = resolve_target("cpu_fp32")
    with pytest.raises(LatencyError, match="at least one model"):
        measure_latency({}, target)
    with pytest.raises(LatencyError, match="no ONNX file"):
        measure_latency({"gone": tmp_path / "missing.onnx"}, target)
    with pytest.raises(LatencyError, match="is an INT8 model"):
        measure_latency({"int8": models.digits_small_int8}, target, **FAST)
    with pytest.raises(LatencyError, match="is an fp32 model"):
        measure_latency({"fp32": models.digits_small}, resolve_target("cpu_int8"), **FAST)
    with pytest.raises(LatencyError, match="the model fixes it to 12"):
        measure_latency({"small": models.digits_small}, target, input_shape=(1, 16, 16), **FAST)
    with pytest.raises(LatencyError, match="cannot load"):
        measure_latency({"junk": b"not an onnx model"}, target)
    with pytest.raises(LatencyError, match="max_seconds"):
        measure_latency({"small": models.digits_small}, target, max_seconds=0)
    assert measure_latency({"small": models.digits_small}, target, warmup=1, max_seconds=0.2)["small"].samples >= 5
    with pytest.raises(LatencyError, match="min_seconds"):
        measure_latency({"small": models.digits_small}, target, min_seconds=2.0, max_seconds=1.0)
    with pytest.raises(LatencyError, match="max_repeats"):
        measure_latency({"small": models.digits_small}, target, min_repeats=50, max_repeats=10)


def test_float_op_kind_mapping() -> None:
    expected = {
        "QLinearConv": "Conv",
        "FusedConv": "Conv",
        "QLinearMatMul": "MatMul",
        "MatMulIntegerToFloat": "MatMul",
        "MatMulInteger": "MatMul",
        "DynamicQuantizeMatMul": "MatMul",
        "FusedMatMul": "MatMul",
        "QGemm": "Gemm",
        "QuantizeLinear": "Quantize/Dequantize",
        "DequantizeLinear": "Quantize/Dequantize",
        "QLinearAdd": "Add",
        "QLinearGlobalAveragePool": "GlobalAveragePool",
        "BiasGelu": "Gelu",
        "SkipLayerNormalization": "LayerNormalization",
        "Softmax": "Softmax",
    }
    assert {op_type: float_op_kind(op_type) for op_type in expected} == expected


def test_op_type_profiles_of_fp32_and_int8(models: Models, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    fp32 = op_type_profile(models.digits_large, resolve_target("cpu_fp32"), runs=5, warmup=2)
    int8 = op_type_profile(models.digits_large_int8.read_bytes(), resolve_target("cpu_int8"), runs=5, warmup=2)
    assert list(scratch.iterdir()) == [], "profile traces and optimized graphs must be removed"
    for profile in (fp32, int8):
        assert {"Conv (dense)", "Conv (depthwise)"} <= set(profile)
        assert all(value > 0 for value in profile.values())
        assert list(profile.values()) == sorted(profile.values(), reverse=True)
    assert "Quantize/Dequantize" in int8
    assert "Quantize/Dequantize" not in fp32
    assert not any(kind.startswith("QLinear") for kind in int8)

    rows = compare_op_types(fp32, int8)
    assert {row.kind for row in rows} == set(fp32) | set(int8)
    quantize = next(row for row in rows if row.kind == "Quantize/Dequantize")
    assert quantize.fp32_us == 0 and quantize.int8_us > 0 and quantize.speedup == 0
    conv = next(row for row in rows if row.kind == "Conv (dense)")
    assert conv.speedup == pytest.approx(conv.fp32_us / conv.int8_us)
    sizes = [max(row.fp32_us, row.int8_us) for row in rows]
    assert sizes == sorted(sizes, reverse=True)


def test_op_type_profile_of_a_token_model(models: Models) -> None:
    profile = op_type_profile(models.tokens_int8, resolve_target("cpu_int8"), runs=3, warmup=1)
    assert "MatMul" in profile and "Quantize/Dequantize" in profile
    assert "MatMulIntegerToFloat" not in profile


def gpu_target(name: str, provider: str) -> LatencyTarget:
    if provider not in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime {onnxruntime.__version__} has no {provider} (providers: {onnxruntime.get_available_providers()})")
    return resolve_target(name)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "provider"), [("cuda_fp32", "CUDAExecutionProvider"), ("tensorrt_fp16", "TensorrtExecutionProvider")])
def test_gpu_targets_measure(models: Models, name: str, provider: str) -> None:
    target = gpu_target(name, provider)
    results = measure_latency({"small": models.digits_small, "large": models.digits_large}, target, **FAST)
    for measurement in results.values():
        check_measurement(measurement, FAST["min_repeats"])
        assert measurement.fingerprint["provider"] == provider
    assert name in available_targets()
