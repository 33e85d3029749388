"""Hardware profiles (``nas profile``): the designed sample, resumable measurement, the quality table beside the noise
floor, refusal of another device, and the search reading latency from a profile."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nas.cli import main
from nas.predictors.base import ForeignFingerprintError
from nas.predictors.profile import (
    MEASUREMENTS_FILE,
    PROFILE_FILE,
    ProfileError,
    ProfileSettings,
    build_profile,
    design_sample,
    find_profile,
    load_profile,
    profile_fingerprint,
    quality,
    split_roles,
    stratum,
)
from nas.run_dir import RunDir
from nas.search.loop import run_search
from nas.search.settings import SearchSettings
from nas.space.schema import load_config, parse_config
from nas.supernets.space import Arch
from nas.training.loop import RunError, train

SPACE = """
name: tiny_profile
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, kernel_size: 3, stride: 1, activation: relu}
stages:
  - depth: [1, 2]
    width: [8, 16]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: relu, squeeze_excite: false}
head: {channels: [16]}
resolution: [6, 8]
training: {epochs: 1, batch_size: 64, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 3}
search: {trials: 6, sampler: random, targets: [cpu_fp32], measure_seconds: 0.1}
"""

FAST = {"measure_seconds": 0.05}


@pytest.fixture(scope="module")
def space_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny_profile.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete cpu_fp32 profile of the tiny space: 15 archs (3 held out, measured twice)."""
    space = parse_config(SPACE, "tiny.yaml").space
    folder = tmp_path_factory.mktemp("profile") / "cpu_fp32"
    result = build_profile(space, ProfileSettings(target="cpu_fp32", budget=15, **FAST), folder)
    assert result.complete and result.measured_total == result.planned_total > 18
    return folder


def test_the_design_sample_spreads_over_input_sizes_and_macs() -> None:
    space = load_config("digits_quick").space
    sample = design_sample(space, 30, seed=0)
    assert len(sample) == len(set(sample)) == 30
    assert sample[:2] == [space.smallest(), space.largest()]
    assert design_sample(space, 30, seed=0) == sample, "a seed gives the same sample"
    sizes = [stratum(space, arch)[0] for arch in sample[2:]]
    assert (
        sorted(set(sizes)) == sorted(space.input_sizes) and max(sizes.count(size) for size in set(sizes)) - min(sizes.count(size) for size in set(sizes)) <= 1
    )
    roles = split_roles(space, sample)
    assert roles.count("test") == 6 and roles[0] == roles[1] == "fit"
    with pytest.raises(ProfileError, match="at least 2"):
        design_sample(space, 1, seed=0)


def test_quality_figures_of_known_values() -> None:
    figures = quality([1.04, 2.18, 2.73, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert figures.count == 4
    assert figures.within_5 == 0.5  # 4% and 0% in; 9% and 9% out of +-5%
    assert figures.within_10 == 1.0
    assert math.isclose(figures.mape, (0.04 + 0.09 + 0.09 + 0.0) / 4)
    assert quality([1.5], [1.0]).within_10 == 0.0
    assert figures.kendall_tau == 1.0
    assert quality([3.0, 2.0, 1.0], [1.0, 2.0, 3.0]).kendall_tau == -1.0


def test_a_profile_holds_every_figure_of_the_quality_table(profiled: Path) -> None:
    header = json.loads((profiled / PROFILE_FILE).read_text())
    report = json.loads((profiled / "quality.json").read_text())
    pieces = [json.loads(line) for line in (profiled / "pieces.jsonl").read_text().splitlines()]
    assert report["complete"] and report["measured"] == report["planned"] == 18 + len(pieces) and report["pieces"] == len(pieces)
    assert len({piece["arch"] for piece in pieces}) == len(pieces) > 5, "each distinct piece of the sample measured once"
    assert report["fit_archs"] == 12 and report["test_archs"] == 3
    for name in ("linear_macs", "lut", "gbdt", "gbdt_lut"):
        row = report["predictors"][name]
        assert row["count"] == 3 and row["fit_measurements"] == 12
        assert 0.0 <= row["within_5"] <= row["within_10"] <= 1.0 and row["mape"] >= 0.0 and -1.0 <= row["kendall_tau"] <= 1.0
        assert (profiled / "predictors" / name / "predictor.json").exists()
    noise = report["noise_floor"]
    assert noise["count"] == 3 and 0.0 <= noise["within_10"] <= 1.0
    assert report["cost"]["measurements"] == 18 + len(pieces) and report["cost"]["minutes"] > 0
    assert header["best"] in ("linear_macs", "lut", "gbdt", "gbdt_lut") and header["fingerprint_key"] == report["fingerprint_key"]
    markdown = (profiled / "quality.md").read_text()
    assert "noise floor" in markdown and "within +-10%" in markdown and "Kendall tau" in markdown

    records = [json.loads(line) for line in (profiled / MEASUREMENTS_FILE).read_text().splitlines()]
    test_archs = {entry["arch"] for entry in header["sample"] if entry["role"] == "test"}
    assert {record["arch"] for record in records if record["pass"] == 2} == test_archs
    space = parse_config(SPACE, "tiny.yaml").space
    profile = load_profile(profiled, space, fingerprint=profile_fingerprint(ProfileSettings(target="cpu_fp32")))
    archs = [Arch.from_json(entry["arch"], space) for entry in header["sample"]]
    predicted = profile.predictor().predict(archs)
    assert predicted.shape == (15,) and np.all(predicted > 0)


def test_sigkill_midway_then_rerun_measures_nothing_twice(space_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile"
    command = [
        sys.executable,
        "-m",
        "nas.cli",
        "profile",
        str(space_file),
        "--target",
        "cpu_fp32",
        "--budget",
        "30",
        "--out",
        str(out),
        "--measure-seconds",
        "0.05",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    measurements = out / MEASUREMENTS_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if measurements.exists() and len(measurements.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the profile finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = measurements.read_bytes()
    kept = [line for line in before.splitlines() if line.endswith(b"}")]
    assert 8 <= len(kept) < 36

    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    after = measurements.read_bytes()
    assert after.startswith(b"\n".join(kept)), "the measurements taken before the kill are kept as they were"
    records = [json.loads(line) for line in after.splitlines()]
    keys = [(record["arch"], record["pass"]) for record in records]
    assert len(keys) == len(set(keys)) == 36, "every (arch, pass) measured exactly once across the kill"
    pieces = [json.loads(line)["arch"] for line in (out / "pieces.jsonl").read_text().splitlines()]
    assert len(pieces) == len(set(pieces)) > 0
    assert "noise floor" in completed.stdout


def test_a_profile_of_another_device_is_refused(profiled: Path, space_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign"
    shutil.copytree(profiled, foreign)
    header = json.loads((foreign / PROFILE_FILE).read_text())
    header["fingerprint"]["cpu_model"] = "Some Other CPU 9000"
    header["fingerprint"]["cpu_flags"] = [*header["fingerprint"]["cpu_flags"], "avx512_vnni"]
    (foreign / PROFILE_FILE).write_text(json.dumps(header))
    space = parse_config(SPACE, "tiny.yaml").space
    fingerprint = profile_fingerprint(ProfileSettings(target="cpu_fp32"))
    with pytest.raises(ForeignFingerprintError, match="cpu_model") as caught:
        load_profile(foreign, space, fingerprint=fingerprint)
    assert set(caught.value.differences) == {"cpu_model", "cpu_flags"}
    assert load_profile(foreign, space, fingerprint=None).header["fingerprint"]["cpu_model"] == "Some Other CPU 9000"

    assert main(["profile", str(space_file), "--target", "cpu_fp32", "--budget", "15", "--out", str(foreign), "--check", "4"]) == 2
    assert "cpu_model" in capsys.readouterr().err
    assert main(["profile", str(space_file), "--target", "cpu_fp32", "--budget", "15", "--out", str(foreign), "--measure-seconds", "0.05"]) == 2
    message = capsys.readouterr().err
    assert "Some Other CPU 9000" in message and "Traceback" not in message

    with pytest.raises(ProfileError, match="not used: .*foreign"):
        find_profile(space, fingerprint, roots=[tmp_path])
    other_space = load_config("digits_quick").space
    with pytest.raises(ProfileError, match="is a profile of space 'tiny_profile', not of space 'digits_quick'"):
        load_profile(profiled, other_space, fingerprint=fingerprint)


def test_a_damaged_profile_is_refused_naming_what_is_wrong(profiled: Path, space_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(profiled, damaged)
    header = json.loads((damaged / PROFILE_FILE).read_text())
    arguments = ["profile", str(space_file), "--target", "cpu_fp32", "--budget", "15", "--out", str(damaged), "--measure-seconds", "0.05"]
    for change, expected in (
        (lambda value: value.pop("sample"), "sample must be list"),
        (lambda value: value["settings"].pop("seed"), "settings.seed is missing"),
        (lambda value: value["sample"].__setitem__(0, {"arch": "{}", "role": "other"}), r"sample\[0\] must be"),
    ):
        edited = json.loads(json.dumps(header))
        change(edited)
        (damaged / PROFILE_FILE).write_text(json.dumps(edited))
        assert main(arguments) == 2
        assert re.search(expected, capsys.readouterr().err)
    (damaged / PROFILE_FILE).write_text(json.dumps(header)[:100])
    assert main(arguments) == 2
    assert "is not strict JSON" in capsys.readouterr().err
    assert (damaged / MEASUREMENTS_FILE).read_bytes() == (profiled / MEASUREMENTS_FILE).read_bytes(), "nothing measured is lost"


def test_a_rerun_with_other_settings_is_refused(profiled: Path, space_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (profiled / MEASUREMENTS_FILE).read_bytes()
    assert main(["profile", str(space_file), "--target", "cpu_fp32", "--budget", "40", "--out", str(profiled), "--measure-seconds", "0.05"]) == 2
    assert "'budget': (15, 40)" in capsys.readouterr().err
    assert (profiled / MEASUREMENTS_FILE).read_bytes() == before
    assert main(["profile", str(space_file), "--target", "cpu_fp32", "--budget", "1"]) == 2
    assert "budget must be an integer >= 2" in capsys.readouterr().err


def test_a_subnet_that_cannot_be_exported_is_recorded_and_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.predictors.profile as profile_module
    from nas.export.onnx import ExportError

    space = parse_config(SPACE, "tiny.yaml").space
    real = profile_module.arch_model
    refused = space.largest()

    def failing(space_: object, arch: Arch, kind: str, *, seed: int = 0) -> bytes:
        if arch == refused:
            raise ExportError("ONNX Runtime output differs from PyTorch (test)")
        return real(space_, arch, kind, seed=seed)

    monkeypatch.setattr(profile_module, "arch_model", failing)
    result = build_profile(space, ProfileSettings(target="cpu_fp32", budget=12, **FAST), tmp_path / "profile")
    assert result.complete
    records = [json.loads(line) for line in (tmp_path / "profile" / MEASUREMENTS_FILE).read_text().splitlines()]
    [failed] = [record for record in records if record["measurement"] is None]
    assert failed["arch"] == refused.to_json() and "differs from PyTorch (test)" in failed["error"]
    report = json.loads((tmp_path / "profile" / "quality.json").read_text())
    assert report["cost"]["export_failures"] == 1 and report["fit_archs"] == 12 - report["test_archs"] - 1
    assert "could not be exported" in (tmp_path / "profile" / "quality.md").read_text()


def test_a_rerun_may_change_the_statistic_and_measures_nothing(profiled: Path, space_file: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(profiled, copy)
    before = [(copy / name).read_bytes() for name in (MEASUREMENTS_FILE, "pieces.jsonl")]
    assert json.loads((copy / "quality.json").read_text())["statistic"] == "p10"
    arguments = ["profile", str(space_file), "--target", "cpu_fp32", "--budget", "15", "--out", str(copy), "--measure-seconds", "0.05"]
    assert main([*arguments, "--statistic", "median"]) == 0
    assert [(copy / name).read_bytes() for name in (MEASUREMENTS_FILE, "pieces.jsonl")] == before
    assert main(arguments) == 0
    assert json.loads((copy / "quality.json").read_text())["statistic"] == "median", "a plain rerun keeps the profile's statistic"
    report = json.loads((copy / "quality.json").read_text())
    header = json.loads((copy / PROFILE_FILE).read_text())
    assert report["statistic"] == header["statistic"] == "median"
    records = [json.loads(line) for line in (copy / MEASUREMENTS_FILE).read_text().splitlines()]
    medians = [record["measurement"]["median_ms"] for record in records if record["pass"] == 1]
    assert report["latency_range_ms"] == [min(medians), max(medians)]


def test_check_measures_fresh_archs_against_every_predictor(profiled: Path, space_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(profiled, copy)
    assert main(["profile", str(space_file), "--target", "cpu_fp32", "--out", str(copy), "--check", "4", "--budget", "15", "--measure-seconds", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "| gbdt | 4 |" in printed and "| lut | 4 |" in printed and "| gbdt_lut | 4 |" in printed and "noise floor" in printed
    [check] = list((copy / "checks").glob("*.json"))
    result = json.loads(check.read_text())
    sampled = {entry["arch"] for entry in json.loads((copy / PROFILE_FILE).read_text())["sample"]}
    assert result["archs"] == 4 and result["noise_floor"]["count"] == 4
    assert len(result["fresh_archs"]) == 4 and not sampled & set(result["fresh_archs"]), "fresh archs only"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    train(parse_config(SPACE, "tiny.yaml"), folder / "run")
    return folder / "run"


def predicted_settings(profile: Path, **overrides: object) -> SearchSettings:
    search = parse_config(SPACE, "tiny.yaml").search
    return SearchSettings.from_config(search, latency="predicted", profiles=(("cpu_fp32", str(profile)),), **overrides)


def test_a_predicted_search_measures_only_its_front_and_reports_both(trained: Path, profiled: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    calls: list[list[tuple[str, str]]] = []

    def measure(models: dict[tuple[str, str], bytes]) -> dict[tuple[str, str], dict[str, object]]:
        calls.append(sorted(models))
        fingerprint = profile_fingerprint(ProfileSettings(target="cpu_fp32"))
        return {
            key: {"median_ms": 1000.0, "p10_ms": 999.0, "p90_ms": 1001.0, "cv": 0.0, "samples": 20, "stable": True, "seconds": 0.1, "fingerprint": fingerprint}
            for key in models
        }

    result = run_search(run_dir, predicted_settings(profiled, latency_limits=(("cpu_fp32", 50.0),)), measure=measure)
    assert result.evaluated == 6
    trials = [trial for trial in result.study.trials if "duplicate_of" not in trial.user_attrs]
    for trial in trials:
        latency = trial.user_attrs["latency_cpu_fp32_ms"]
        assert latency["predicted"] is True and latency["predictor"] in ("linear_macs", "lut", "gbdt", "gbdt_lut") and 0 < latency["median_ms"] < 50
    check = json.loads(RunDir(run_dir).front_check.read_text())
    rows = check["targets"]["cpu_fp32"]
    assert len(calls) == 1, "nothing is measured during the search; the front once at the end"
    assert sorted(arch for arch, _ in calls[0]) == sorted(row["arch"] for row in rows)
    assert rows and all(row["breaks_limit"] and row["measured"]["median_ms"] == 1000.0 for row in rows)
    assert all(row["statistic"] == "p10" for row in rows), "the profile predicts the 10th percentile by default"
    assert all(math.isclose(row["relative_error"], (row["predicted_ms"] - 999.0) / 999.0) for row in rows)


def test_nas_run_with_predicted_latency_reports_predicted_and_measured(trained: Path, profiled: Path, space_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    completed = subprocess.run(
        [sys.executable, "-m", "nas.cli", "run", str(space_file), "--out", str(out), "--latency", "predicted", "--profile", str(profiled), "--no-export"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    report = (out / "report.md").read_text()
    rows = json.loads(RunDir(out).front_check.read_text())["targets"]["cpu_fp32"]
    assert "## Predicted against measured latency" in report
    for row in rows:
        assert row["measured"]["samples"] > 0 and row["measured"]["median_ms"] > 0
        assert f"| {row['trial']} |" in report.split("## Predicted against measured latency")[1]


def test_profile_and_predicted_run_refuse_bad_use_before_any_work(profiled: Path, space_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a_file").write_text("x")
    assert main(["profile", str(space_file), "--target", "cpu_fp32", "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a profile folder" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(space_file), "--out", str(out), "--profile", str(profiled), "--no-export"]) == 2
    assert "--profile is used only with --latency predicted" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(SPACE.replace("name: tiny_profile", "name: tiny_unprofiled"))
    assert main(["run", str(other), "--out", str(out), "--latency", "predicted", "--no-export"]) == 2
    assert "no hardware profile of space 'tiny_unprofiled'" in capsys.readouterr().err
    assert not (out / "checkpoint").exists(), "refused before the supernet is trained"


def test_a_predicted_search_without_a_usable_profile_is_a_clear_error(trained: Path, profiled: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    with pytest.raises(RunError, match="no usable profile.*no hardware profile of space 'tiny_profile'"):
        run_search(run_dir, SearchSettings.from_config(parse_config(SPACE, "tiny.yaml").search, latency="predicted"))
    with pytest.raises(RunError, match="search.profiles names target 'cpu_int8'"):
        SearchSettings.from_config(parse_config(SPACE, "tiny.yaml").search, latency="predicted", profiles=(("cpu_int8", str(profiled)),))


SHIPPED = Path(__file__).resolve().parents[2] / "hardware_profiles"


@pytest.mark.parametrize("folder", sorted(path for path in SHIPPED.glob("*/*") if path.is_dir()), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_shipped_profile_belongs_to_its_builtin_space_as_it_is_now(folder: Path) -> None:
    """A change to a built-in space (a resolution, a field) makes its shipped profiles refuse it: rebuild them with it."""
    profile = load_profile(folder, load_config(folder.parent.name).space, fingerprint=None)
    assert profile.complete and profile.best is not None
    largest, smallest = profile.predictor().predict([profile.space.largest(), profile.space.smallest()])
    assert largest > smallest
