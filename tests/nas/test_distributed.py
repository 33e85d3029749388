"""Data-parallel training: N workers at B/N each train the same job as one worker at B.

Without Ray, two gloo processes run ``train_worker`` for every registered training method on a sequence space (no
batch norm, so the only difference is the float32 reduction order) and must follow the one-process loss curve and
end with its accuracies. Through Ray Train and the CLI, ``nas train --workers 2`` on a tiny digits space must end
near the one-worker run (batch norm sees B/2 per worker), and a worker SIGKILLed mid-epoch must make the run resume
from its checkpoint and end with exactly the metrics of the uninterrupted two-worker run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nas.space.schema import parse_config
from nas.supernets.strategies import STRATEGIES
from nas.training.checkpoint import prepare_run_dir
from nas.training.loop import RunError, train, train_worker
from nas.training.world import WorkerMismatchError, World
from tests.helpers import TINY_DIGITS_SPACE
from tests.nas.test_methods import MQAR, config_text

METHODS = sorted(STRATEGIES.names())
LOSS_TOLERANCE = 1e-3
"""Relative difference allowed between the per-epoch losses of 1 worker at B and 2 workers at B/2 (no batch norm):
float32 sums reduced in another order, compounded over six epochs of training. Measured on dev-2core: 1.0e-6
(mixture) to 1.7e-4 (DεpS, whose phases distil from frozen copies)."""
ACCURACY_TOLERANCE = 0.02
"""Absolute difference allowed between their final accuracies (a few validation items may flip)."""
DIGITS_TOLERANCE = 0.06
"""Absolute accuracy difference allowed on the batch-norm digits space: each worker normalises with the statistics
of its own 32 images instead of all 64 (benchmarks/README.md, "Training across workers", measures it at scale)."""


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def gloo_worker(rank: int, size: int, port: int, jobs: list[tuple[str, str]]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        for text, run_dir in jobs:
            train_worker(parse_config(text, "test"), Path(run_dir), world=World(rank, size))
    finally:
        dist.destroy_process_group()


def log_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def accuracies(metrics: dict) -> dict[str, float]:
    return {f"{size}.{split}": metrics[size][split] for size in ("largest", "smallest") for split in ("val", "test")}


@pytest.fixture(scope="module")
def two_workers_every_method(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every method trained on the MQAR space by one process at B=32 and by two gloo workers at 16 each."""
    root = tmp_path_factory.mktemp("gloo")
    jobs, runs = [], {}
    for method in METHODS:
        config = parse_config(config_text(MQAR, method), "test")
        prepare_run_dir(root / f"{method}_2", config, resume=False)
        jobs.append((config.text, str(root / f"{method}_2")))
        runs[method] = (root / f"{method}_1", root / f"{method}_2")
    context = mp.get_context("spawn")
    processes = [context.Process(target=gloo_worker, args=(rank, 2, free_port_once(root), jobs)) for rank in range(2)]
    for process in processes:
        process.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            train(parse_config(config_text(MQAR, method), "test"), root / f"{method}_1")
    finally:
        torch.set_num_threads(threads)
        for process in processes:
            process.join(timeout=600)
    assert [process.exitcode for process in processes] == [0, 0]
    return runs


def free_port_once(root: Path) -> int:
    """One port for both workers of the fixture (chosen once, remembered in the fixture's folder)."""
    record = root / "port"
    if not record.exists():
        record.write_text(str(free_port()))
    return int(record.read_text())


@pytest.mark.parametrize("method", METHODS)
def test_two_workers_at_half_batch_follow_one_worker(two_workers_every_method: dict[str, tuple[Path, Path]], method: str) -> None:
    one, two = two_workers_every_method[method]
    losses_one, losses_two = log_losses(one), log_losses(two)
    assert len(losses_one) == len(losses_two) == 6
    assert losses_two == pytest.approx(losses_one, rel=LOSS_TOLERANCE)
    phases_one = [json.loads(line)["phase"] for line in (one / "log.jsonl").read_text().splitlines()]
    phases_two = [json.loads(line)["phase"] for line in (two / "log.jsonl").read_text().splitlines()]
    assert phases_one == phases_two
    metrics_one = json.loads((one / "metrics.json").read_text())
    metrics_two = json.loads((two / "metrics.json").read_text())
    assert metrics_two["workers"] == 2
    for name, value in accuracies(metrics_one).items():
        assert accuracies(metrics_two)[name] == pytest.approx(value, abs=ACCURACY_TOLERANCE), name


def test_workers_that_train_different_subnets_are_caught() -> None:
    """The gradient sentinel: a worker holding another number of gradients than its peers is an error, not a
    silently wrong average (checked here with a fake one-process group of size 2)."""
    port = free_port()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        parameter = torch.nn.Parameter(torch.ones(3))
        parameter.grad = torch.ones(3)
        with pytest.raises(WorkerMismatchError, match="trained different subnets"):
            World(rank=0, size=2).average_gradients([parameter])
    finally:
        dist.destroy_process_group()


def test_world_shares_rows_and_refuses_uneven_batches() -> None:
    assert World(0, 2).rows(64) == slice(0, 32)
    assert World(1, 2).rows(64) == slice(32, 64)
    assert World().rows(64) is None
    config = parse_config(config_text(MQAR, "sandwich").replace("batch_size: 32", "batch_size: 33"), "test")
    with pytest.raises(RunError, match=r"batch_size \(33\) must be a multiple of --workers \(2\)"):
        train(config, Path("/nonexistent/never/created"), workers=2)
    with pytest.raises(RunError, match="--workers must be an integer >= 1, got 0"):
        train(config, Path("/nonexistent/never/created"), workers=0)


DIGITS = TINY_DIGITS_SPACE.replace("name: tiny", "name: ray_digits") + (
    "task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}\n"
    "training: {epochs: 4, batch_size: 64, lr: 0.01, random_subnets: 1, calibration_batches: 2, seed: 3}\n"
)


def nas_train(space: Path, out: Path, *extra: str) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "train", str(space), "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    return text


def ray_train_workers(parent: int) -> list[psutil.Process]:
    """The Ray Train worker processes under the ``nas train`` process ``parent`` (its local Ray runs below it)."""
    found = []
    for process in psutil.Process(parent).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny digits space trained by `nas train` with 1 worker, 2 workers, and 2 workers of which one is
    SIGKILLed during epoch 2. The two-worker runs go one after the other (each starts its own local Ray); the first
    while a Ray cluster started by `ray start` runs on the machine, which a local run must not try to join."""
    root = tmp_path_factory.mktemp("ray")
    space = root / "space.yaml"
    space.write_text(DIGITS.replace("task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}\n", "", 1))
    runs = {"one": root / "one", "two": root / "two", "killed": root / "killed"}
    single = nas_train(space, runs["one"])
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    try:
        finish(nas_train(space, runs["two"], "--workers", "2"))
    finally:
        head.terminate()
        head.wait(timeout=120)
    finish(single)
    killed = nas_train(space, runs["killed"], "--workers", "2")
    log = runs["killed"] / "log.jsonl"
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and killed.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 1:
            workers = ray_train_workers(killed.pid)
            if workers:
                victim = workers[-1]
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    assert victim is not None, "no Ray Train worker was found to kill during epoch 2"
    finish(killed)
    return runs


def test_nas_train_two_workers_matches_one_within_batch_norm_tolerance(digits_runs: dict[str, Path]) -> None:
    one = json.loads((digits_runs["one"] / "metrics.json").read_text())
    two = json.loads((digits_runs["two"] / "metrics.json").read_text())
    assert two["workers"] == 2 and "workers" not in one
    for name, value in accuracies(one).items():
        assert accuracies(two)[name] == pytest.approx(value, abs=DIGITS_TOLERANCE), name
    attempts = [json.loads(line) for line in (digits_runs["two"] / "attempts.jsonl").read_text().splitlines()]
    assert attempts == [{**attempts[0], "workers": 2, "resumed_from_epoch": 0}]


def test_worker_killed_mid_epoch_resumes_to_the_same_metrics(digits_runs: dict[str, Path]) -> None:
    attempts = [json.loads(line) for line in (digits_runs["killed"] / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2, attempts
    assert attempts[1]["resumed_from_epoch"] >= 1
    uninterrupted = json.loads((digits_runs["two"] / "metrics.json").read_text())
    killed = json.loads((digits_runs["killed"] / "metrics.json").read_text())
    assert accuracies(killed) == accuracies(uninterrupted)
    assert log_losses(digits_runs["killed"]) == log_losses(digits_runs["two"])
