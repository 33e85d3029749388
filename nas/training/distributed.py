"""Data-parallel supernet training on Ray Train: ``nas train SPACE --workers N [--address ADDR]``.

The driver (this process) prepares the run folder and holds its lock; Ray Train's ``TorchTrainer`` starts N workers
(one CPU each, or one GPU each where the cluster has them; gloo on CPU, NCCL on GPU) that each run
``nas.training.loop.train_worker`` on the run folder: the same loop as one process, with its share of every batch
and the gradients averaged (``nas.training.world``). Rank 0 writes the checkpoint after every epoch, exactly as a
single process does.

Failures: when a worker dies (killed, out of memory, its node preempted), Ray Train stops the group and starts it
again, up to ``max_failures`` times; every worker of the new group loads the newest checkpoint of the run folder
and replays the interrupted epoch from its start. Every random draw of an epoch comes from ``(seed, epoch)``, so the
replay is the epoch the uninterrupted run trained, and the run ends with the same metrics. Each start of a worker
group is one line of ``attempts.jsonl`` in the run folder (when, how many workers, from which epoch).

The run folder must be reachable at the same path from every worker: on one machine (or the loopback cluster of
the README) it is; on a cluster of several machines put ``--out`` on storage every node mounts at the same path.
A worker that cannot see it stops with a message saying so. The space file is read back from the run folder, and
its dataset is loaded by every worker (a user dataset folder must exist on every node too).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from nas.ray_connect import RAY_INSTALL_HINT, connect
from nas.run_dir import RunDir
from nas.space.schema import RunConfig, parse_config
from nas.training.checkpoint import RunError
from nas.training.loop import ProgressFactory, TrainResult, train_worker
from nas.training.world import World

logger = logging.getLogger(__name__)

MAX_FAILURES = 3
"""How many times Ray Train starts the worker group again after a worker died, before the run fails."""


class DistributedTrainingError(RunError):
    """Training on Ray ended without finishing (the message carries the workers' error)."""


PURPOSE = "training with --workers > 1 or --address"


def _ray_train() -> Any:
    try:
        import ray
        import ray.train
        import ray.train.torch
    except ImportError as error:
        raise ImportError(f"{PURPOSE} needs Ray Train: {RAY_INSTALL_HINT} ({error})") from error
    return ray


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: rebuild the config from the run folder, train, report each epoch."""
    import ray.train
    import torch

    context = ray.train.get_context()
    world = World(rank=context.get_world_rank(), size=context.get_world_size())
    torch.set_num_threads(loop_config["threads"])
    run_dir = Path(loop_config["run_dir"])
    layout = RunDir(run_dir)
    if not layout.config.is_file():
        raise RunError(
            f"worker {world.rank} on {socket.gethostname()} cannot see the run folder {run_dir}: on a cluster of several machines, "
            "--out must be on storage every node mounts at the same path"
        )
    config = parse_config(layout.config.read_text(), str(layout.config), base_dir=layout.origin_dir(), check_constraints=False)

    def report(record: dict[str, Any]) -> None:
        ray.train.report({"epoch": record["epoch"], "loss": record["loss"]})

    train_worker(
        config,
        run_dir,
        world=world,
        task_data=loop_config["task_data"],
        stop_after_epochs=loop_config["stop_after_epochs"],
        epoch_done=report,
    )


def _log_records(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of the run's log (a line being written is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _follow_log(run_dir: Path, progress: ProgressFactory, total: int, steps_per_epoch: int, completed: int, stop: threading.Event) -> None:
    """Advance a progress bar by one epoch's steps for every new line of the run's log, until ``stop``."""
    bar = progress(total, "train", completed * steps_per_epoch)
    seen = completed
    try:
        while not stop.wait(0.5):
            records = _log_records(RunDir(run_dir).log)
            epochs = max((int(record.get("epoch", 0)) for record in records), default=0)
            if epochs > seen:
                bar.update((epochs - seen) * steps_per_epoch)
                bar.set_postfix({"epoch": epochs, "loss": f"{records[-1].get('loss', float('nan')):.3f}"})
                seen = epochs
    finally:
        bar.close()


def train_on_ray(
    config: RunConfig,
    run_dir: Path,
    *,
    workers: int,
    address: str | None,
    completed: int,
    steps_per_epoch: int,
    progress: ProgressFactory | None = None,
    task_data: Any = None,
    stop_after_epochs: int | None = None,
    max_failures: int = MAX_FAILURES,
) -> TrainResult:
    """Train the prepared run folder ``run_dir`` with ``workers`` Ray Train workers (see the module docstring).
    ``task_data``: the data every worker trains on when the caller has it in hand (sent through Ray's object store);
    None, and each worker loads the space's dataset itself. ``address``: an existing Ray cluster (``auto`` or
    HOST:PORT); without it a local Ray with ``workers`` CPUs is started (or the one this process started is used).
    ``steps_per_epoch`` sizes the progress bar."""
    ray = _ray_train()
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    threads = max(1, int(os.environ.get("NASFORGE_THREADS_PER_WORKER", "1")))
    started_ray = connect(address, workers * threads, PURPOSE)
    run_dir = Path(run_dir).resolve()
    layout = RunDir(run_dir)
    use_gpu = bool(ray.cluster_resources().get("GPU", 0) >= workers)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"run_dir": str(run_dir), "task_data": task_data, "stop_after_epochs": stop_after_epochs, "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"GPU": 1} if use_gpu else {"CPU": threads}),
        run_config=RayRunConfig(name="train", storage_path=str(layout.ray_train), failure_config=FailureConfig(max_failures=max_failures)),
    )
    follower = None
    stop = threading.Event()
    if progress is not None:
        follower = threading.Thread(
            target=_follow_log, args=(run_dir, progress, config.training.epochs * steps_per_epoch, steps_per_epoch, completed, stop), daemon=True
        )
        follower.start()
    logger.info("training %s on %d Ray Train workers (%s)", run_dir, workers, "GPU, NCCL" if use_gpu else "CPU, gloo")
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread below
            outcome["error"] = error

    # fit() runs in a thread of its own so that Ctrl-C reaches this thread as KeyboardInterrupt (Ray Train's own
    # SIGINT handler, installed only from the main thread, aborts and exits the process with status 1).
    runner = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    runner.start()
    try:
        while runner.is_alive():
            runner.join(0.5)
    finally:
        stop.set()
        if follower is not None:
            follower.join()
        if started_ray or runner.is_alive():
            ray.shutdown()
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if error is not None:
        raise DistributedTrainingError(
            f"training on Ray with {workers} workers failed: {error}. Ray Train starts the workers again up to {max_failures} times "
            f"after a worker dies ({layout.attempts} lists every start); the run continues from its last checkpoint with --resume"
        )
    metrics = json.loads(layout.metrics.read_text()) if layout.metrics.exists() else {}
    return TrainResult(run_dir, metrics, completed)


__all__ = ["MAX_FAILURES", "DistributedTrainingError", "train_on_ray"]
