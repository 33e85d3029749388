"""A run folder survives crashes, moves and concurrent use: a cut-short study journal or latency cache is repaired
(the cut bytes kept in a side file), a folder held by a live process is refused at once with its pid, a holder that
died never blocks, a copied or moved folder is usable, no lock makes anything wait without bound, a damaged
checkpoint falls back or is a clear error, and exports appear complete or not at all."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.export.subnet import export_arch
from nas.run_dir import RunDir
from nas.run_lock import RunBusyError, RunLock, holder, holds_lock
from nas.search.latency_cache import LatencyCache
from nas.search.loop import run_search
from nas.search.settings import SearchSettings
from nas.search.study import BoundedJournalLock, journal_storage, load_study
from nas.space.schema import parse_config
from nas.training.checkpoint import checkpoint_dir, load_run
from nas.training.loop import RunError, train
from tests.helpers import TINY_DIGITS_SPACE

SPACE = TINY_DIGITS_SPACE + (
    "training: {epochs: 1, batch_size: 64, lr: 0.01, random_subnets: 1, calibration_batches: 1, seed: 0}\n"
    "search: {trials: 4, sampler: random, targets: [cpu_fp32], measure_seconds: 0.05}\n"
)
HOLDER = """
import sys, time
from nas.run_lock import RunLock
RunLock(sys.argv[1], command="holder for a test").acquire()
print("held", flush=True)
time.sleep(600)
"""


def nas(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small `nas run` (trained, searched, no export); tests work on copies."""
    folder = tmp_path_factory.mktemp("finished")
    (folder / "tiny.yaml").write_text(SPACE)
    result = nas("run", "tiny.yaml", "--out", "run", "--no-export", cwd=folder, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture
def work(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run in ``tmp_path / "run"`` with its space file beside it."""
    shutil.copy(finished / "tiny.yaml", tmp_path / "tiny.yaml")
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path


def trials(run_dir: Path) -> dict[int, tuple[str, str, list[float] | None]]:
    """Every trial as Optuna reads the journal, without repairing or locking anything: number -> (state, arch, values)."""
    study = optuna.load_study(study_name="nasforge", storage=journal_storage(RunDir(run_dir).study))
    return {trial.number: (trial.state.name, trial.user_attrs.get("arch", ""), trial.values) for trial in study.get_trials(deepcopy=False)}


def completed(run_dir: Path) -> dict[str, list[float]]:
    """arch -> values of every complete trial."""
    return {arch: values for state, arch, values in trials(run_dir).values() if state == "COMPLETE" and values is not None}


def folder_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run_dir)): path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file() and path.name != ".lock"}


def start_holder(run_dir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == "held", process.stderr.read() if process.stderr else ""
    return process


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=60)


def settings() -> SearchSettings:
    return SearchSettings.from_config(parse_config(SPACE, "tiny.yaml").search)


def test_a_journal_cut_short_is_repaired_on_resume_and_nothing_finished_is_lost(work: Path) -> None:
    run_dir = work / "run"
    journal, cache = RunDir(run_dir).study, RunDir(run_dir).latency_cache
    finished_before = completed(run_dir)
    assert len(finished_before) == 4
    subprocess.run(["truncate", "-s", "-7", str(journal)], check=True)
    subprocess.run(["truncate", "-s", "-5", str(cache)], check=True)
    cut_journal, cut_cache = journal.read_bytes(), cache.read_bytes()
    journal_tail = cut_journal[cut_journal.rfind(b"\n") + 1 :]
    cache_tail = cut_cache[cut_cache.rfind(b"\n") + 1 :]
    assert journal_tail and cache_tail
    complete_in_cut = {number: record for number, record in trials(run_dir).items() if record[0] == "COMPLETE"}
    assert len(complete_in_cut) == 3, "the cut record was the last trial's completion"

    result = nas("run", "tiny.yaml", "--out", "run", "--resume", "--no-export", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    journal_side = list(journal.parent.glob("study.journal.partial-*"))
    cache_side = list(cache.parent.glob("latency.jsonl.partial-*"))
    assert len(journal_side) == 1 and journal_side[0].read_bytes() == journal_tail
    assert len(cache_side) == 1 and cache_side[0].read_bytes() == cache_tail
    assert f"repaired {Path('run/search/study.journal')}" in result.stderr and journal_side[0].name in result.stderr
    assert f"({len(journal_tail)} bytes" in result.stderr
    assert journal.read_bytes().startswith(cut_journal[: len(cut_journal) - len(journal_tail)])
    after = trials(run_dir)
    for number, record in complete_in_cut.items():
        assert after[number] == record, f"completed trial {number} changed"
    accuracy_after = {arch: values[0] for arch, values in completed(run_dir).items()}
    assert accuracy_after == {arch: values[0] for arch, values in finished_before.items()}, "the cut trial is run again, to the same accuracy"
    retried = [number for number, (state, _, _) in after.items() if state == "FAIL"]
    assert retried == [3]
    measured = [json.loads(line)["arch"] for line in cache.read_bytes().splitlines()]
    assert sorted(measured) == sorted(finished_before), "the measurement whose line was cut is taken again, once"


def test_a_journal_damaged_mid_file_is_a_clear_error(work: Path) -> None:
    journal = RunDir(work / "run").study
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5][: len(lines[5]) // 2] + b"\n"
    journal.write_bytes(b"".join(lines))
    damaged = journal.read_bytes()
    result = nas("run", "tiny.yaml", "--out", "run", "--resume", "--no-export", cwd=work)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "record 6" in result.stderr and "damaged mid-file" in result.stderr
    assert journal.read_bytes() == damaged


def test_a_busy_folder_is_refused_at_once_naming_the_holder_and_a_killed_holder_never_blocks(work: Path) -> None:
    run_dir = work / "run"
    before = folder_bytes(run_dir)
    finished_before = completed(run_dir)
    process = start_holder(run_dir)
    try:
        result = nas("run", "tiny.yaml", "--out", "run", "--resume", "--no-export", cwd=work)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert f"is in use by process {process.pid} on " in result.stderr and "holder for a test" in result.stderr
        assert process.poll() is None, "the holder is untouched"
        assert folder_bytes(run_dir) == before, "the refused run changed nothing"
        assert holder(run_dir)["pid"] == process.pid

        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        assert holder(run_dir)["pid"] == process.pid, "a killed holder leaves its description behind"
        result = nas("run", "tiny.yaml", "--out", "run", "--resume", "--no-export", cwd=work)
        assert result.returncode == 0, result.stderr
        assert completed(run_dir) == finished_before
        assert (run_dir / ".lock").read_text() == "", "a finished holder clears its description"
    finally:
        stop(process)


def test_a_second_nas_run_on_a_searching_folder_is_refused_and_the_first_finishes_untouched(work: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "run", "tiny.yaml", "--out", "run", "--resume", "--trials", "40", "--no-export"],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and (holder(work / "run") or {}).get("pid") != first.pid:
            time.sleep(0.1)
        assert (holder(work / "run") or {}).get("pid") == first.pid
        second = nas("run", "tiny.yaml", "--out", "run", "--resume", "--trials", "40", "--no-export", cwd=work)
        assert first.poll() is None, "the first run was still searching when the second was refused"
        assert second.returncode == 2, second.stderr
        assert f"is in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err
    finally:
        stop(first)
    states = [state for state, _, _ in trials(work / "run").values()]
    assert set(states) == {"COMPLETE"}, "no trial of the first run was failed by the second"
    assert len(completed(work / "run")) == 40


def test_a_folder_copied_while_held_is_usable(work: Path) -> None:
    process = start_holder(work / "run")
    try:
        shutil.copytree(work / "run", work / "copy")
        assert holder(work / "copy")["pid"] == process.pid, "the copy carries the holder's description"
        result = nas("run", "tiny.yaml", "--out", "copy", "--resume", "--no-export", cwd=work)
        assert result.returncode == 0, result.stderr
        assert completed(work / "copy") == completed(work / "run")
        assert process.poll() is None
    finally:
        stop(process)


def test_a_stale_journal_lock_in_a_moved_folder_is_removed_at_open(work: Path) -> None:
    old = work / "run"
    journal = RunDir(old).study
    os.symlink(str(journal.resolve()), str(journal.resolve()) + ".lock")
    os.rename(old, work / "moved")
    lock = RunDir(work / "moved").study.with_name("study.journal.lock")
    assert os.path.lexists(lock) and not lock.exists(), "the lock now points nowhere (a spin in Optuna's own lock)"
    result = nas("run", "tiny.yaml", "--out", "moved", "--resume", "--trials", "5", "--no-export", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stderr and "study.journal.lock" in result.stderr
    assert not os.path.lexists(lock)
    assert len(completed(work / "moved")) == 5


def test_the_journal_lock_never_waits_without_bound(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = tmp_path / "study.journal"
    journal.write_bytes(b"")
    lock_file = str(journal) + ".lock"

    os.symlink(str(tmp_path / "elsewhere" / "study.journal"), lock_file)
    with caplog.at_level(logging.WARNING, logger="nas.search.study"):
        lock = BoundedJournalLock(str(journal), grace_period=3600, max_wait=3600)
        assert lock.acquire()
    assert os.readlink(lock_file) == str(journal), "a lock pointing nowhere is broken at once, not after the grace period"
    assert "points at a journal that is not there" in caplog.text
    lock.release()

    os.symlink(str(journal), lock_file)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas.search.study"):
        assert BoundedJournalLock(str(journal), grace_period=0.2, max_wait=3600).acquire()
    assert "was not released" in caplog.text
    os.unlink(lock_file)

    os.symlink(str(journal), lock_file)
    with pytest.raises(RunError, match=r"study\.journal\.lock kept being taken"):
        BoundedJournalLock(str(journal), grace_period=3600, max_wait=0.2).acquire()
    os.unlink(lock_file)


def test_the_python_api_refuses_a_busy_folder_and_reads_it_without_changing_it(work: Path) -> None:
    run_dir = work / "run"
    config = parse_config(SPACE, str(work / "tiny.yaml"))
    journal = RunDir(run_dir).study
    journal.write_bytes(journal.read_bytes()[:-7])
    before = folder_bytes(run_dir)
    process = start_holder(run_dir)
    try:
        for call in (
            lambda: train(config, run_dir, resume=True),
            lambda: run_search(run_dir, settings(), resume=True),
            lambda: export_arch(run_dir, "smallest", int8=False),
        ):
            with pytest.raises(RunBusyError, match=f"process {process.pid} on "):
                call()
        assert not holds_lock(run_dir)
        study = load_study(run_dir)
        assert len([trial for trial in study.trials if trial.state == TrialState.COMPLETE]) == 3
        assert folder_bytes(run_dir) == before, "reading a busy folder repairs nothing"
    finally:
        stop(process)
    with RunLock(run_dir, command="this test"):
        other = subprocess.run([sys.executable, "-c", HOLDER, str(run_dir)], capture_output=True, text=True, timeout=120, check=False)
    assert other.returncode != 0 and "held" not in other.stdout
    assert f"RunBusyError: {run_dir} is in use by process {os.getpid()} on " in other.stderr and "this test" in other.stderr


def test_a_latency_cache_cut_short_is_set_aside_and_appends_start_on_their_own_line(tmp_path: Path) -> None:
    path = tmp_path / "latency.jsonl"
    cache = LatencyCache(path)
    cache.put("arch-a", "cpu_fp32", "key", {"median_ms": 1.0})
    cache.put("arch-b", "cpu_fp32", "key", {"median_ms": 2.0})
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"arch": "arch-c", "target": "cpu_fp32", "fingerprint_key": "key", "measurement": {"median')
    reopened = LatencyCache(path)
    assert reopened.get("arch-b", "cpu_fp32", "key") == {"median_ms": 2.0}
    assert reopened.get("arch-c", "cpu_fp32", "key") is None
    assert path.read_bytes() == whole
    (side,) = tmp_path.glob("latency.jsonl.partial-*")
    assert side.read_bytes().startswith(b'{"arch": "arch-c"') and side.read_bytes().endswith(b'{"median')
    reopened.put("arch-c", "cpu_fp32", "key", {"median_ms": 3.0})
    assert LatencyCache(path).get("arch-c", "cpu_fp32", "key") == {"median_ms": 3.0}


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: _cut(folder / "weights.safetensors"), r"weights\.safetensors is .*cut short"),
        (lambda folder: (folder / "weights.safetensors").unlink(), r"weights\.safetensors is missing"),
        (lambda folder: _cut(folder / "optimizer.safetensors"), r"optimizer\.safetensors is"),
        (lambda folder: (folder / "state.json").write_text('{"epochs_completed": 1, "hist'), r"state\.json is not valid JSON"),
        (lambda folder: (folder / "state.json").write_text("[]"), r"state\.json has no integer epochs_completed"),
    ],
    ids=["weights_cut", "weights_missing", "optimizer_cut", "state_cut", "state_not_a_checkpoint"],
)
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_or_is_a_clear_error(work: Path, damage, message: str) -> None:
    layout = RunDir(work / "run")
    shutil.copytree(layout.checkpoint, layout.checkpoint_previous)
    damage(layout.checkpoint)
    assert checkpoint_dir(work / "run") == layout.checkpoint_previous
    _, _, state = load_run(work / "run")
    assert state["epochs_completed"] == 1

    shutil.rmtree(layout.checkpoint_previous)
    with pytest.raises(RunError, match=message):
        checkpoint_dir(work / "run")


def test_a_damaged_checkpoint_is_a_clear_message_on_the_command_line(work: Path) -> None:
    _cut(RunDir(work / "run").checkpoint / "weights.safetensors")
    result = nas("train", "tiny.yaml", "--out", "run", "--resume", cwd=work)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "weights.safetensors" in result.stderr and "cut short" in result.stderr


def test_an_export_appears_complete_or_not_at_all(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.export.subnet as subnet

    run_dir = work / "run"
    config, _, _ = load_run(run_dir)
    target = RunDir(run_dir).exports / config.space.smallest().short_name()
    files = {"model.onnx", "arch.yaml", "weights.safetensors", "export.json"}

    real = subnet.export_subnet

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(subnet, "export_subnet", killed)
    with pytest.raises(KeyboardInterrupt):
        export_arch(run_dir, "smallest", int8=False)
    assert not target.exists(), "a killed export leaves no folder under the export's name"
    assert (target.parent / (target.name + ".tmp") / "model.onnx").exists()
    monkeypatch.setattr(subnet, "export_subnet", real)

    report = export_arch(run_dir, "smallest", int8=False)
    assert report.out_dir == target and report.export.path == target / "model.onnx"
    assert {path.name for path in target.iterdir()} == files
    assert [path.name for path in target.parent.iterdir()] == [target.name], "the leftover staging folder is gone"
    assert json.loads((target / "export.json").read_text())["onnx"] == "model.onnx"

    again = export_arch(run_dir, "smallest", int8=False)
    assert {path.name for path in again.out_dir.iterdir()} == files

    mine = work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="notes.txt"):
        export_arch(run_dir, "smallest", int8=False, out=mine)
    assert (mine / "notes.txt").read_text() == "keep me"
