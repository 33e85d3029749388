"""Training: checkpoints every epoch, SIGKILL + --resume ends with the same metrics, run-directory safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nas.space.schema import parse_config
from nas.training.loop import RunError, train
from tests.helpers import TINY_DIGITS_SPACE

TINY_SPACE = TINY_DIGITS_SPACE.replace("name: tiny", "name: tiny_digits") + (
    "training: {epochs: EPOCHS, batch_size: 64, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 3}\n"
)


def space_file(tmp_path: Path, epochs: int) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_SPACE.replace("EPOCHS", str(epochs)))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nas.cli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_training_then_resume_gives_the_same_metrics(tmp_path: Path) -> None:
    space = space_file(tmp_path, epochs=6)
    reference = run_cli("train", str(space), "--out", "reference", cwd=tmp_path)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    killed = run_cli("train", str(space), "--out", "killed", cwd=tmp_path)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    completed = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["epochs_completed"]
    assert 2 <= completed < 6, "the kill must land mid-training"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = run_cli("train", str(space), "--out", "killed", "--resume", cwd=tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    actual = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    expected.pop("train_seconds")
    actual.pop("train_seconds")
    assert actual == expected
    history = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert history[-1]["epoch"] == 6


def test_existing_run_is_never_overwritten_without_resume(tmp_path: Path) -> None:
    config = parse_config(space_file(tmp_path, epochs=1).read_text(), "tiny.yaml")
    train(config, tmp_path / "run")
    weights = (tmp_path / "run" / "checkpoint" / "weights.safetensors").read_bytes()
    with pytest.raises(RunError, match="--resume"):
        train(config, tmp_path / "run")
    other = parse_config(space_file(tmp_path, epochs=2).read_text(), "tiny.yaml")
    with pytest.raises(RunError, match="different space"):
        train(other, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoint" / "weights.safetensors").read_bytes() == weights


def test_same_seed_gives_the_same_run(tmp_path: Path) -> None:
    config = parse_config(space_file(tmp_path, epochs=2).read_text(), "tiny.yaml")
    first = train(config, tmp_path / "a").metrics
    second = train(config, tmp_path / "b").metrics
    first.pop("train_seconds")
    second.pop("train_seconds")
    assert first == second
    assert 0.1 < first["largest"]["test"] <= 1.0
