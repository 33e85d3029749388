"""Supernet training: the step loop, phases, teachers, and the final evaluation.

What trains is the strategy's business (``nas.supernets.strategies``): for every epoch the loop asks for the
phase, and for every step for the ``SubnetTask`` list; it computes each task's loss as the task says, keeps the
teachers (the step's in-place teacher, the frozen copies each phase names) and applies one optimizer update per
run of tasks with the same learning-rate scale. Nothing here knows a strategy by name.

A run directory holds ``config.yaml`` (the space file as given), ``checkpoint/`` (replaced atomically at the end
of every epoch, see ``nas.training.checkpoint``), ``log.jsonl`` (one line per epoch, with its phase) and, when
training ends, ``metrics.json``.

Every random draw of epoch ``e`` comes from generators seeded with ``(seed, e)``, and a phase starts after that
seeding, so a run resumed from the checkpoint of epoch ``e - 1`` continues exactly as the uninterrupted run would
have. Data-parallel workers (``nas.training.world``) share every draw that decides what is trained (batch order,
augmentation, subnets, a phase's transform of the weights); after the phase has started, each reseeds torch's
global generator with its rank, so that dropout masks differ between workers as they differ between the rows of one
worker's batch.
"""

from __future__ import annotations

import copy
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas import durable, jsonio
from nas.data.splits import TaskData, iterate_batches
from nas.data.tasks import load_task_data
from nas.run_dir import RunDir
from nas.run_lock import locks_run_dir
from nas.space.schema import RunConfig, TrainingModel
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.strategies import STRATEGIES, FrozenTeacher, InplaceTeacher, Phase, Schedule, StrategyError, SubnetTask, TrainingStrategy
from nas.supernets.supernet import Supernet
from nas.training.checkpoint import RunError, checkpoint_dir, load_checkpoint, load_run, prepare_run_dir, save_checkpoint
from nas.training.evaluation import correct_and_total, evaluate_arch, prepare_batch, run_calibration_batches
from nas.training.world import World

logger = logging.getLogger(__name__)


class Progress(Protocol):
    def update(self, count: int = 1) -> Any: ...

    def set_postfix(self, values: dict[str, Any]) -> Any: ...

    def close(self) -> Any: ...


ProgressFactory = Callable[[int, str, int], Progress]


@dataclass(frozen=True, slots=True)
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    resumed_from_epoch: int


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def make_optimizer(supernet: nn.Module, training: TrainingModel) -> torch.optim.Optimizer:
    decay = [p for n, p in supernet.named_parameters() if p.ndim > 1 and "transforms" not in n]
    no_decay = [p for n, p in supernet.named_parameters() if p.ndim <= 1 or "transforms" in n]
    groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=training.lr)


def build_strategy(config: RunConfig, steps_per_epoch: int) -> TrainingStrategy[Any]:
    """The strategy ``training.strategy`` with its options from ``training:`` and the run's schedule."""
    training = config.training
    schedule = Schedule(training.lr, training.epochs, training.warmup_epochs, steps_per_epoch)
    return STRATEGIES.get(training.strategy)(config.space, training.strategy_options(), schedule)


def augment(
    inputs: torch.Tensor, generator: torch.Generator, max_shift: float = 0.1, *, batch_size: int | None = None, rows: slice | None = None
) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` of its size. inputs: [B, C, H, W].

    A data-parallel worker passes the global ``batch_size`` and its ``rows`` of it (``inputs`` holds those rows):
    the shifts are drawn for the whole batch, as one worker would, and this worker's rows applied."""
    shifts = (torch.rand(batch_size or inputs.shape[0], 2, generator=generator) * 2 - 1) * max_shift * 2
    if rows is not None:
        shifts = shifts[rows]
    batch = inputs.shape[0]
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = shifts
    grid = F.affine_grid(theta, list(inputs.shape), align_corners=False)
    return F.grid_sample(inputs, grid, padding_mode="border", align_corners=False)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy from the teacher's predictions over scored positions. logits: [..., C]; targets: [...]."""
    mask = (targets != -100).float()
    per_item = -(F.softmax(teacher, dim=-1) * F.log_softmax(student, dim=-1)).sum(dim=-1)
    return (per_item * mask).sum() / mask.sum().clamp_min(1)


def align_teacher(teacher: torch.Tensor, student: torch.Tensor, arch: Arch) -> torch.Tensor:
    """The teacher's predictions at the student's positions. image: [B, C]; sequence: [B, L_teacher, C] cut to
    the student's [B, L, C] (the student's sequence is a prefix of the teacher's)."""
    if student.ndim == 3:
        teacher = teacher[:, : student.shape[1]]
    if teacher.shape != student.shape:
        raise StrategyError(
            f"the teacher's predictions {list(teacher.shape)} do not cover those of the student {arch.short_name()} {list(student.shape)}; "
            "a teacher must see at least the student's sequence length"
        )
    return teacher


def freeze(supernet: Supernet) -> Supernet:
    """A frozen copy of ``supernet``: its own storage, no gradients."""
    frozen = copy.deepcopy(supernet)
    frozen.requires_grad_(False)
    return frozen


class StepTeachers:
    """The teachers of one step: the in-place teacher's predictions once a task provides them, and the frozen
    copies' predictions, each computed at most once per (copy, arch)."""

    def __init__(self, frozen: Mapping[str, Supernet], inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.frozen = frozen
        self.inputs = inputs
        self.targets = targets
        self.inplace: torch.Tensor | None = None
        self.cache: dict[tuple[str, Arch], torch.Tensor] = {}

    def predictions(self, teacher: InplaceTeacher | FrozenTeacher, task_index: int) -> torch.Tensor:
        if isinstance(teacher, InplaceTeacher):
            if self.inplace is None:
                raise StrategyError(f"task {task_index} learns from the in-place teacher, but no earlier task of the step has provides_teacher=True")
            return self.inplace
        key = (teacher.name, teacher.arch)
        if key not in self.cache:
            if teacher.name not in self.frozen:
                raise StrategyError(
                    f"task {task_index} learns from the frozen copy {teacher.name!r}, but no phase so far froze it; frozen: {sorted(self.frozen)}"
                )
            network = self.frozen[teacher.name]
            network.set_active(teacher.arch)
            network.train()
            with torch.no_grad():
                self.cache[key] = network(prepare_batch(self.inputs, self.targets, teacher.arch)[0])
        return self.cache[key]


def task_loss(task: SubnetTask, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    """``label_weight`` * cross-entropy with ``targets`` + ``teacher_weight`` * soft cross-entropy with ``teacher``
    (terms of weight 0 are not computed). logits: [B, C] or [B, L, C]; targets: [B] or [B, L] (-100 unscored)."""
    terms = []
    if task.label_weight:
        labels = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100, label_smoothing=label_smoothing)
        terms.append(task.label_weight * labels)
    if task.teacher_weight and teacher is not None:
        terms.append(task.teacher_weight * distillation_loss(logits, teacher, targets))
    return sum(terms[1:], terms[0])


def train_step(
    supernet: Supernet,
    tasks: list[SubnetTask],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    lr: float,
    label_smoothing: float = 0.0,
    frozen: Mapping[str, Supernet] | None = None,
    world: World | None = None,
) -> tuple[float, int, int]:
    """Train one batch on ``tasks``: gradients of consecutive tasks with equal ``lr_scale`` accumulate into one
    optimizer update at ``lr * lr_scale``. Returns the first task's loss, hits and scored count.
    inputs: [B, C, H, W] or [B, L]; targets: [B] or [B, L]. With a ``world`` of several workers, ``inputs`` is this
    worker's share of the batch and the gradients are averaged over the workers before every update."""
    if not tasks:
        raise StrategyError("a step needs at least one task, got none")
    teachers = StepTeachers(frozen or {}, inputs, targets)
    stats: tuple[float, int, int] | None = None
    start = 0
    while start < len(tasks):
        end = start + 1
        while end < len(tasks) and tasks[end].lr_scale == tasks[start].lr_scale:
            end += 1
        optimizer.zero_grad(set_to_none=True)
        for index in range(start, end):
            task = tasks[index]
            supernet.set_active(task.arch)
            x, y = prepare_batch(inputs, targets, task.arch)
            logits = supernet(x)
            teacher = None if task.teacher is None else align_teacher(teachers.predictions(task.teacher, index), logits, task.arch)
            loss = task_loss(task, logits, y, teacher, label_smoothing)
            loss.backward()
            if task.provides_teacher:
                teachers.inplace = logits.detach()
            if stats is None:
                stats = (float(loss.detach()), *correct_and_total(logits.detach(), y))
        if world is not None:
            world.average_gradients(parameter for group in optimizer.param_groups for parameter in group["params"])
        for group in optimizer.param_groups:
            group["lr"] = lr * tasks[start].lr_scale
        optimizer.step()
        start = end
    assert stats is not None
    return stats


def start_phase(
    strategy: TrainingStrategy[Any],
    phase: Phase,
    epoch: int,
    supernet: Supernet,
    optimizer: torch.optim.Optimizer,
    frozen: dict[str, Supernet],
    training: TrainingModel,
) -> torch.optim.Optimizer:
    """Start ``phase`` at ``epoch``: take its frozen copies, start a fresh optimizer if it asks, then let the
    strategy transform the supernet. Returns the optimizer to use from now on."""
    logger.info("phase %s starts at epoch %d", phase.name, epoch + 1)
    for name in phase.freeze:
        frozen[name] = freeze(supernet)
    if phase.reset_optimizer:
        optimizer = make_optimizer(supernet, training)
    with torch.no_grad():
        strategy.on_phase_start(supernet, phase, epoch)
    return optimizer


def family_archs(space: SearchSpace) -> dict[str, tuple[Arch, Arch]]:
    """Largest and smallest subnet of every block type that can fill every block position of the space."""
    names = [choices.type for choices in space.stages[0].blocks]
    families = {}
    for name in names:
        if all(any(choices.type == name for choices in stage.blocks) for stage in space.stages):
            families[name] = (space.largest(name), space.smallest(name))
    return families


def final_metrics(supernet: Supernet, config: RunConfig, task_data: TaskData) -> dict[str, Any]:
    """Validation and test accuracy of the largest and smallest subnet (and of each block family)."""
    calibration = run_calibration_batches(config, task_data.train)

    def score(arch: Arch) -> dict[str, Any]:
        results: dict[str, Any] = {"arch": arch.to_dict()}
        for name, split in (("val", task_data.val), ("test", task_data.test)):
            results[name] = evaluate_arch(supernet, arch, calibration, split)
        return results

    metrics: dict[str, Any] = {"largest": score(config.space.largest()), "smallest": score(config.space.smallest())}
    families = family_archs(config.space)
    if len(families) > 1:
        metrics["families"] = {name: {"largest": score(large), "smallest": score(small)} for name, (large, small) in families.items()}
    return metrics


def record_attempt(layout: RunDir, workers: int, resumed_from_epoch: int) -> None:
    """One line of ``attempts.jsonl`` for every start (or restart) of training: when, where, how many workers."""
    jsonio.append_line(
        layout.attempts,
        {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workers": workers, "resumed_from_epoch": resumed_from_epoch, "host": socket.gethostname()},
    )


EpochDone = Callable[[dict[str, Any]], None]
"""Called by every worker after each epoch's checkpoint is written, with the epoch's log record."""


@locks_run_dir("run_dir", create=True)
def train(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: ProgressFactory | None = None,
    task_data: TaskData | None = None,
    stop_after_epochs: int | None = None,
    workers: int = 1,
    address: str | None = None,
) -> TrainResult:
    """Train the supernet of ``config`` into ``run_dir`` (see the module docstring).

    ``stop_after_epochs`` ends the call after that many epochs of this invocation (used by tests and by callers
    that train in slices); the final evaluation runs only when all epochs are done.

    ``workers`` > 1 or an ``address`` trains data-parallel on Ray Train (``nas.training.distributed``): the same
    job, each worker on its share of every batch; ``workers`` 1 without an address trains in this process.

    The call holds the run folder's lock (``nas.run_lock``): a folder another process holds raises ``RunBusyError``
    at once. A damaged checkpoint falls back to the previous one or is a ``RunError`` naming the file.
    """
    run_dir = Path(run_dir)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise RunError(f"--workers must be an integer >= 1, got {workers!r}")
    if config.training.batch_size % workers:
        raise RunError(f"training.batch_size ({config.training.batch_size}) must be a multiple of --workers ({workers}): each worker trains an equal share")
    if workers > 1 or address:
        from nas.ray_connect import check

        check(address, workers)
    data = task_data or load_task_data(config.task, config.space, seed=config.training.seed)
    completed = prepare_run_dir(run_dir, config, resume)
    if (workers > 1 or address) and completed < config.training.epochs:
        from nas.training.distributed import train_on_ray

        steps_per_epoch = max(1, len(data.train.targets) // config.training.batch_size)
        return train_on_ray(
            config,
            run_dir,
            workers=workers,
            address=address,
            completed=completed,
            steps_per_epoch=steps_per_epoch,
            progress=progress,
            task_data=task_data,
            stop_after_epochs=stop_after_epochs,
        )
    metrics = train_worker(config, run_dir, progress=progress, task_data=data, stop_after_epochs=stop_after_epochs)
    return TrainResult(run_dir, metrics, completed)


def train_worker(
    config: RunConfig,
    run_dir: Path,
    *,
    world: World | None = None,
    progress: ProgressFactory | None = None,
    task_data: TaskData | None = None,
    stop_after_epochs: int | None = None,
    epoch_done: EpochDone | None = None,
) -> dict[str, Any]:
    """One worker's training of the prepared run folder ``run_dir``, from its newest checkpoint if it has one.
    Returns the final metrics once every epoch is done (``{}`` before that, and on workers other than rank 0).

    Every worker keeps the same supernet: same seeds, same subnets, its ``world.rows`` of every batch, gradients
    averaged at every update (``nas.training.world``). Rank 0 alone writes the checkpoint, the log and the metrics.
    """
    world = world or World()
    training = config.training
    world.check_batch(training.batch_size)
    task_data = task_data or load_task_data(config.task, config.space, seed=training.seed)
    if world.writes:
        durable.set_aside_cut_record(RunDir(run_dir).log)
    steps_per_epoch = max(1, len(task_data.train.targets) // training.batch_size)
    strategy = build_strategy(config, steps_per_epoch)
    torch.manual_seed(training.seed)
    supernet = strategy.build_supernet(config.space, strategy.options)
    optimizer = make_optimizer(supernet, training)
    state: dict[str, Any] = {"epochs_completed": 0, "train_seconds": 0.0, "history": [], "phase": None, "strategy": strategy.state_dict()}
    frozen: dict[str, Supernet] = {}
    folder = checkpoint_dir(run_dir)
    if folder is not None:
        state, frozen_weights = load_checkpoint(folder, supernet, optimizer)
        for name, weights in frozen_weights.items():
            frozen[name] = freeze(supernet)
            frozen[name].load_state_dict(weights)
        strategy.load_state_dict(state.get("strategy", {}))
        logger.info("resuming %s after epoch %d (phase %s)", run_dir, state["epochs_completed"], state.get("phase"))
    completed = int(state["epochs_completed"])
    if world.writes and completed < training.epochs:
        record_attempt(RunDir(run_dir), world.size, completed)
    rows = world.rows(training.batch_size)
    bar = progress(training.epochs * steps_per_epoch, "train", completed * steps_per_epoch) if progress else None
    epochs_run = 0
    try:
        for epoch in range(completed, training.epochs):
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
            started = time.perf_counter()
            seed = epoch_seed(training.seed, epoch)
            rng = np.random.default_rng(seed)
            generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            phase = strategy.phase(epoch)
            if phase.name != state.get("phase"):
                optimizer = start_phase(strategy, phase, epoch, supernet, optimizer, frozen, training)
                state["phase"] = phase.name
            if world.size > 1:
                torch.manual_seed(epoch_seed(seed, world.rank))
            supernet.train()
            totals = [0.0, 0, 0]
            batches = iterate_batches(task_data.train, training.batch_size, shuffle=True, generator=generator, drop_last=True, rows=rows)
            for step, (inputs, targets) in enumerate(batches):
                if training.augment and config.space.modality == "image":
                    inputs = augment(inputs, generator, batch_size=training.batch_size, rows=rows)
                tasks = strategy.tasks(phase, rng, epoch, step)
                loss, hits, count = train_step(
                    supernet,
                    tasks,
                    inputs,
                    targets,
                    optimizer=optimizer,
                    lr=strategy.learning_rate(epoch, step),
                    label_smoothing=training.label_smoothing,
                    frozen=frozen,
                    world=world,
                )
                totals[0] += loss
                totals[1] += hits
                totals[2] += count
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        {"epoch": epoch + 1, "phase": phase.name, "loss": f"{totals[0] / (step + 1):.3f}", "acc": f"{totals[1] / max(totals[2], 1):.3f}"}
                    )
            loss_sum, hits, count = world.sum(totals)
            world.average_buffers(supernet)
            record = {"epoch": epoch + 1, "phase": phase.name, "loss": loss_sum / world.size / steps_per_epoch, "train_accuracy": hits / max(count, 1)}
            state["history"].append(record)
            state["epochs_completed"] = epoch + 1
            state["train_seconds"] = state["train_seconds"] + time.perf_counter() - started
            state["strategy"] = strategy.state_dict()
            if world.writes:
                save_checkpoint(run_dir, supernet, optimizer, state, frozen)
                jsonio.append_line(RunDir(run_dir).log, record)
                logger.info("epoch %d/%d (%s) loss %.4f accuracy %.4f", epoch + 1, training.epochs, phase.name, record["loss"], record["train_accuracy"])
            world.barrier()
            if epoch_done is not None:
                epoch_done(record)
            epochs_run += 1
    finally:
        if bar is not None:
            bar.close()
    metrics: dict[str, Any] = {}
    if state["epochs_completed"] == training.epochs and world.writes:
        metrics = final_metrics(supernet, config, task_data)
        metrics["epochs"] = training.epochs
        metrics["phases"] = [record.get("phase") for record in state["history"]]
        metrics["train_seconds"] = state["train_seconds"]
        if world.size > 1:
            metrics["workers"] = world.size
        jsonio.write(RunDir(run_dir).metrics, metrics)
    return metrics


__all__ = ["RunError", "TrainResult", "World", "build_strategy", "load_run", "train", "train_step", "train_worker"]
