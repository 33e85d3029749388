"""Search: Optuna space from YAML, dedup, constraints, resume after SIGKILL, Ray evaluators that die, outputs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from nas.run_dir import RunDir
from nas.search.encoding import arch_from_params, param_distributions, params_from_arch, suggest_arch
from nas.search.evaluators import Evaluator
from nas.search.front import absent_reason, hypervolume, pareto_front, target_accuracy
from nas.search.loop import run_search
from nas.search.settings import SearchSettings
from nas.search.study import distinct_trials, journal_storage
from nas.space.schema import builtin_spaces, load_config, parse_config
from nas.supernets.space import Arch
from nas.training.loop import RunError, train

TINY_SPACE = """
name: tiny_search
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, kernel_size: 3, stride: 1, activation: relu}
stages:
  - depth: [1, 2]
    width: [8, 16]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: relu, squeeze_excite: false}
  - depth: [1, 2]
    width: [16, 24]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: relu, squeeze_excite: [false, true]}
head: {channels: [32]}
resolution: [6, 8]
training: {epochs: 2, batch_size: 64, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 3}
search: {trials: 8, sampler: nsga2, population_size: 4, targets: [cpu_fp32, cpu_int8], measure_seconds: 0.15}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny run directory (copied per test so that searches do not share a study)."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.yaml").write_text(TINY_SPACE)
    train(parse_config(TINY_SPACE, "tiny.yaml"), folder / "run")
    return folder


def fresh_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def settings(**overrides) -> SearchSettings:
    return SearchSettings.from_config(parse_config(TINY_SPACE, "tiny.yaml").search, **overrides)


@pytest.mark.parametrize("name", sorted(builtin_spaces()))
def test_params_round_trip_every_builtin_space(name: str) -> None:
    space = load_config(name).space
    distributions = param_distributions(space)
    rng = np.random.default_rng(0)
    for arch in [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(20))]:
        params = params_from_arch(space, arch)
        assert set(params) <= set(distributions)
        assert all(params[key] in distributions[key].choices for key in params)
        assert arch_from_params(space, params) == arch


def test_a_trial_has_only_the_fields_of_the_block_type_it_chose() -> None:
    space = load_config("mqar_quick").space
    assert {choices.type for choices in space.stages[0].blocks} == {"gated_attention", "gla"}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen_types, seen_depths = set(), set()
    for _ in range(40):
        trial = study.ask()
        arch = suggest_arch(trial, space)
        study.tell(trial, [0.0, 0.0])
        depth = trial.params["s0.depth"]
        seen_depths.add(depth)
        for position in range(max(space.stages[0].depths)):
            keys = {key for key in trial.params if key.startswith(f"s0.b{position}.")}
            if position >= depth:
                assert not keys, f"position {position} is past depth {depth}: {keys}"
                continue
            chosen = trial.params[f"s0.b{position}.type"]
            seen_types.add(chosen)
            assert all(key.split(".")[2] in ("type", chosen) for key in keys), keys
            assert f"s0.b{position}.{chosen}.num_heads" in keys
        assert arch_from_params(space, trial.params) == arch
        assert params_from_arch(space, arch) == trial.params
    assert seen_types == {"gated_attention", "gla"} and seen_depths == {1, 2}
    distributions = {name: distribution for trial in study.trials for name, distribution in trial.distributions.items()}
    assert distributions == param_distributions(space), "the trials' distributions are the space's, parameter by parameter"


def test_distributions_cover_every_choice_of_the_space() -> None:
    space = parse_config(TINY_SPACE).space
    distributions = param_distributions(space)
    # size, 2 x (depth, width), stage 0: 2 positions x (kernel, expand), stage 1: 2 positions x (kernel, expand, SE)
    assert len(distributions) == 1 + 4 + 4 + 6
    assert distributions["s1.b1.mbconv.squeeze_excite"].choices == (False, True)


def test_front_and_hypervolume_of_a_known_set() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("settings", {"targets": ["cpu_fp32"]})
    points = [(0.5, 2.0), (0.9, 5.0), (0.4, 3.0), (0.9, 6.0), (0.5, 2.0), (0.95, 9.0)]
    for index, values in enumerate(points):
        trial = study.ask()
        trial.set_user_attr("arch", str(index))
        trial.set_constraint("params", 1.0 if index == 5 else -1.0)
        study.tell(trial, list(values))
    front = pareto_front(study, "cpu_fp32")
    assert [trial.number for trial in front] == [0, 4, 1], "dominated and infeasible trials left out, ties kept, fastest first"
    assert hypervolume(front, 1, 10.0) == pytest.approx(0.5 * 8 + 0.4 * 5)
    assert hypervolume([], 1, 10.0) == 0.0


def test_no_module_imports_a_private_part_of_another_library() -> None:
    """No ``import x._y``, ``from x._y import z``, ``from x import _z`` or ``x._y`` on an imported third-party name
    anywhere under nas/, supernets/ and kernels/ (a minor release may remove them)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    first_party = {"nas", "supernets", "kernels"}

    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    def third_party(module: str) -> bool:
        top = module.split(".")[0]
        return top not in first_party and top not in sys.stdlib_module_names and top != "__future__"

    found = []
    files = [path for folder in first_party for path in sorted((root / folder).rglob("*.py"))]
    assert len(files) > 30
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        imported: set[str] = set()
        where = f"{path.relative_to(root)}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if third_party(alias.name):
                        imported.add(alias.asname or alias.name.split(".")[0])
                        if any(private(part) for part in alias.name.split(".")):
                            found.append(f"{where}:{node.lineno} import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and third_party(node.module):
                for alias in node.names:
                    imported.add(alias.asname or alias.name)
                    if any(private(part) for part in [*node.module.split("."), alias.name]):
                        found.append(f"{where}:{node.lineno} from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in imported:
                    found.append(f"{where}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def test_search_evaluates_each_arch_once_and_stores_an_openable_study(trained: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(trained, tmp_path)
    result = run_search(run_dir, settings())
    assert result.evaluated == 8

    storage = journal_storage(RunDir(run_dir).study)
    study = optuna.load_study(study_name="nasforge", storage=storage)
    assert [direction.name for direction in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    assert study.metric_names == ["accuracy", "latency_cpu_fp32_ms", "latency_cpu_int8_ms"]
    distinct = distinct_trials(study)
    archs = [trial.user_attrs["arch"] for trial in distinct]
    assert len(archs) == len(set(archs)) == 8
    space = parse_config(TINY_SPACE).space
    assert space.largest().to_json() in archs and space.smallest().to_json() in archs
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        if "duplicate_of" in trial.user_attrs:
            original = study.trials[trial.user_attrs["duplicate_of"]]
            assert trial.user_attrs["arch"] == original.user_attrs["arch"] and trial.values == original.values
            continue
        assert 0.0 <= trial.values[0] <= 1.0
        for name, value in zip(("cpu_fp32", "cpu_int8"), trial.values[1:], strict=True):
            measurement = trial.user_attrs[f"latency_{name}_ms"]
            assert measurement["median_ms"] == value > 0
            assert measurement["p10_ms"] <= measurement["median_ms"]
            assert measurement["fingerprint"]["precision"] == name.split("_")[1]
    lines = [json.loads(line) for line in (RunDir(run_dir).latency_cache).read_text().splitlines()]
    keys = [(line["arch"], line["target"]) for line in lines]
    assert len(keys) == len(set(keys)) == 16, "every (arch, target) is measured exactly once"

    largest = next(trial for trial in distinct if trial.user_attrs["arch"] == space.largest().to_json())
    smallest = next(trial for trial in distinct if trial.user_attrs["arch"] == space.smallest().to_json())
    assert largest.user_attrs["params"] > smallest.user_attrs["params"]
    for target in ("cpu_fp32", "cpu_int8"):
        front = pareto_front(study, target)
        assert front
        index = 1 + ["cpu_fp32", "cpu_int8"].index(target)
        # each front ranks the model it ships for the target by that model's own accuracy (INT8: ``int8_accuracy``)
        candidates = [trial for trial in distinct if absent_reason(trial, target) is None]
        for member in front:
            accuracy = target_accuracy(member, target)
            assert not any(
                target_accuracy(other, target) >= accuracy
                and other.values[index] <= member.values[index]
                and (target_accuracy(other, target) > accuracy or other.values[index] < member.values[index])
                for other in candidates
            ), "a front member is dominated"


def test_constraints_reach_the_sampler_and_the_front(trained: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(trained, tmp_path)
    space = parse_config(TINY_SPACE).space
    from nas.supernets.costs import arch_cost

    limit = (arch_cost(space, space.largest())[0] + arch_cost(space, space.smallest())[0]) // 2
    result = run_search(run_dir, settings(max_params=limit, trials=6))
    study = result.study
    trials = distinct_trials(study)
    assert any(trial.user_attrs["params"] > limit for trial in trials), "the largest arch must break the limit"
    for trial in trials:
        # Optuna's own record (Trial.set_constraint) is what the samplers and best_trials read.
        assert trial.constraints == {"params": float(trial.user_attrs["params"] - limit)}
    for target in ("cpu_fp32", "cpu_int8"):
        assert all(trial.user_attrs["params"] <= limit for trial in pareto_front(study, target))
    assert all(trial.user_attrs["params"] <= limit for trial in study.best_trials)


def test_a_different_search_is_refused_in_the_same_run_dir(trained: Path, tmp_path: Path) -> None:
    run_dir = fresh_run(trained, tmp_path)
    run_search(run_dir, settings(trials=2))
    with pytest.raises(RunError, match="already holds a search"):
        run_search(run_dir, settings(trials=2))
    with pytest.raises(RunError, match="targets"):
        run_search(run_dir, settings(trials=3, targets=("cpu_fp32",)), resume=True)


def test_bad_targets_and_constraints_are_clear_errors() -> None:
    with pytest.raises(RunError, match="unknown latency target"):
        settings(targets=("cpu_fp33",))
    with pytest.raises(RunError, match="did you mean 'nsga2'"):
        settings(sampler="nsga")
    text = TINY_SPACE.replace("targets: [cpu_fp32, cpu_int8]", "targets: [cpu_fp32], constraints: {latency_ms: {cpu_int8: 1.0}}")
    with pytest.raises(RunError, match="not among search.targets"):
        SearchSettings.from_config(parse_config(text).search)


class DiesOnce(Evaluator):
    """Kills its own process on the first arch any evaluator sees in the test (a marker file says it happened)."""

    def evaluate(self, arch_json: str):
        marker = Path(os.environ["NASFORGE_TEST_MARKER"])
        try:
            descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().evaluate(arch_json)
        os.write(descriptor, arch_json.encode())
        os.close(descriptor)
        os._exit(1)


def test_an_evaluator_that_dies_has_its_trial_retried_and_the_run_goes_on(trained: Path, tmp_path: Path, monkeypatch) -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "died"
    monkeypatch.setenv("NASFORGE_TEST_MARKER", str(marker))
    run_dir = fresh_run(trained, tmp_path)
    try:
        result = run_search(run_dir, settings(trials=5, workers=2), factory=DiesOnce)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists(), "an evaluator must have died"
    assert result.evaluated == 5 and result.failed == 0
    archs = {trial.user_attrs["arch"] for trial in distinct_trials(result.study)}
    assert marker.read_text() in archs, "the arch whose evaluator died was evaluated elsewhere"
    workers = {trial.user_attrs["worker"] for trial in distinct_trials(result.study)}
    assert len(workers) >= 2, "evaluations ran in Ray actors, not in this process"
    assert all("(ray node " in worker and worker.split(":")[1].split()[0] != str(os.getpid()) for worker in workers)


def run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nas.cli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_trials(run_dir: Path) -> dict[int, tuple[str, list[float]]]:
    path = RunDir(run_dir).study
    if not path.exists():
        return {}
    try:
        study = optuna.load_study(study_name="nasforge", storage=journal_storage(path))
    except KeyError:
        return {}
    return {trial.number: (trial.user_attrs["arch"], trial.values) for trial in study.get_trials(states=(TrialState.COMPLETE,))}


def test_sigkill_mid_search_then_resume_loses_and_reruns_nothing(trained: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(trained / "tiny.yaml", tmp_path / "tiny.yaml")
    run_dir = fresh_run(trained, tmp_path)
    process = run_cli("run", "tiny.yaml", "--out", "run", "--trials", "12", "--no-export", cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(complete_trials(run_dir)) < 4 and process.poll() is None:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = complete_trials(run_dir)
    assert 4 <= len({arch for arch, _ in before.values()}) < 12, "the kill must land mid-search"
    measured_before = (RunDir(run_dir).latency_cache).read_text().splitlines()

    resumed = run_cli("run", "tiny.yaml", "--out", "run", "--trials", "12", "--resume", "--no-export", cwd=tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    after = complete_trials(run_dir)
    for number, record in before.items():
        assert after[number] == record, f"completed trial {number} changed or was lost"
    study = optuna.load_study(study_name="nasforge", storage=journal_storage(RunDir(run_dir).study))
    archs = [trial.user_attrs["arch"] for trial in distinct_trials(study)]
    assert len(archs) == len(set(archs)) == 12, "each arch evaluated once across both runs"
    measured = (RunDir(run_dir).latency_cache).read_text().splitlines()
    assert measured[: len(measured_before)] == measured_before
    keys = [(json.loads(line)["arch"], json.loads(line)["target"]) for line in measured]
    assert len(keys) == len(set(keys)), "no arch measured twice"
    assert "front on cpu_fp32" in out and (run_dir / "report.md").exists()


def test_nas_run_writes_the_front_report_and_exports(trained: Path, tmp_path: Path) -> None:
    import onnx

    shutil_copy = __import__("shutil").copy
    shutil_copy(trained / "tiny.yaml", tmp_path / "tiny.yaml")
    run_dir = fresh_run(trained, tmp_path)
    process = run_cli("run", "tiny.yaml", "--out", "run", "--trials", "6", cwd=tmp_path)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    summary = json.loads((run_dir / "pareto.json").read_text())
    assert set(summary["fronts"]) == {"cpu_fp32", "cpu_int8"}
    members = [member for front in summary["fronts"].values() for member in front["members"]]
    assert members
    for member in members:
        folder = run_dir / member["export"]["folder"]
        assert {"model.onnx", "arch.yaml", "weights.safetensors", "export.json"} <= {path.name for path in folder.iterdir()}
        onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
        assert member["export"]["onnx_max_abs_error"] <= 1e-4
        assert Arch.from_dict(member["arch"]).to_json() == json.dumps(member["arch"], sort_keys=True)
    assert (run_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(run_dir / "trials.csv") as file:
        rows = list(csv.DictReader(file))
    assert len([row for row in rows if row["state"] == "COMPLETE" and not row["duplicate_of"]]) == 6
    report = (run_dir / "report.md").read_text()
    assert "## Front on `cpu_fp32`" in report and "## Front on `cpu_int8`" in report
    assert "## INT8 vs fp32 by op type" in report and "Faster in INT8" in report
    assert "onnxruntime" in report.lower()

    again = run_cli("export", "run", "--trial", str(members[0]["trial"]), "--out", "again", cwd=tmp_path)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert any((tmp_path / "again").glob("*/model.onnx"))


def test_nas_run_rejects_bad_options_without_a_traceback(tmp_path: Path) -> None:
    process = run_cli("run", "--targets", "cpu_fp32,gpu_magic", "--out", "x", cwd=tmp_path)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "unknown latency target" in err and "Traceback" not in err


def test_ctrl_c_mid_search_exits_130_cleanly_and_resume_finishes(trained: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copy(trained / "tiny.yaml", tmp_path / "tiny.yaml")
    run_dir = fresh_run(trained, tmp_path)
    process = run_cli("run", "tiny.yaml", "--out", "run", "--trials", "24", "--no-export", cwd=tmp_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not complete_trials(run_dir) and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    before = complete_trials(run_dir)
    assert 0 < len({arch for arch, _ in before.values()}) < 24

    resumed = run_cli("run", "tiny.yaml", "--out", "run", "--trials", "24", "--resume", "--no-export", cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    after = complete_trials(run_dir)
    assert all(after[number] == record for number, record in before.items())
    assert len({arch for arch, _ in after.values()}) == 24


def test_a_journal_lock_left_by_a_killed_process_is_broken(tmp_path: Path) -> None:
    script = """
import os, sys, time
from pathlib import Path
import optuna
from nas.search.study import journal_storage
path = Path("run/search/study.journal")
path.parent.mkdir(parents=True)
optuna.create_study(study_name="first", storage=journal_storage(path))
os.symlink(str(path.resolve()), str(path.resolve()) + ".lock")  # what a writer killed while appending leaves
started = time.monotonic()
optuna.create_study(study_name="second", storage=journal_storage(path))
print(round(time.monotonic() - started, 1))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 60
    names = [summary.study_name for summary in optuna.get_all_study_summaries(journal_storage(tmp_path / "run/search/study.journal"))]
    assert names == ["first", "second"]
