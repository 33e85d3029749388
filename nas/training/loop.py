"""Supernet training: the step loop, checkpoints every epoch, resume, and the final evaluation.

A run directory holds ``config.yaml`` (the space file as given), ``checkpoint/`` (``weights.safetensors``,
``optimizer.safetensors``, ``state.json``; replaced atomically at the end of every epoch), ``log.jsonl`` (one line
per epoch) and, when training ends, ``metrics.json``.

Every random draw of epoch ``e`` comes from generators seeded with ``(seed, e)``, so a run resumed from the
checkpoint of epoch ``e - 1`` continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import nas
from nas.space.schema import RunConfig, TrainingModel, parse_config
from nas.data.datasets import TaskData, iterate_batches
from nas.run_dir import CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CONFIG_FILE, RunDir
from nas.training.evaluation import correct_and_total, evaluate_arch, prepare_batch
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.strategies import STRATEGIES
from nas.supernets.supernet import Supernet
from nas.data.tasks import load_task_data

logger = logging.getLogger(__name__)



class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists without --resume, or holds another space)."""


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


def learning_rate(training: TrainingModel, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up for ``warmup_epochs``, then cosine decay to zero."""
    total = training.epochs * steps_per_epoch
    warmup = min(training.warmup_epochs * steps_per_epoch, total - 1)
    if step < warmup:
        return training.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return training.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(supernet: Supernet, training: TrainingModel) -> torch.optim.Optimizer:
    decay = [p for n, p in supernet.named_parameters() if p.ndim > 1 and "transforms" not in n]
    no_decay = [p for n, p in supernet.named_parameters() if p.ndim <= 1 or "transforms" in n]
    groups = [{"params": decay, "weight_decay": training.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=training.lr)


def augment(inputs: torch.Tensor, generator: torch.Generator, max_shift: float = 0.1) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` of its size. inputs: [B, C, H, W]."""
    batch = inputs.shape[0]
    shifts = (torch.rand(batch, 2, generator=generator) * 2 - 1) * max_shift * 2
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


def train_step(
    supernet: Supernet, strategy: Any, training: TrainingModel, inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator, epoch: int, step: int
) -> tuple[float, int, int]:
    """One sandwich-style step (gradients accumulated over the strategy's subnets). Returns the teacher's loss,
    hits and scored count."""
    teacher_logits: torch.Tensor | None = None
    teacher_stats = (0.0, 0, 0)
    for task in strategy.subnets(rng, epoch, step):
        supernet.set_active(task.arch)
        x, y = prepare_batch(inputs, targets, task.arch)
        logits = supernet(x)
        if task.distill and teacher_logits is not None:
            teacher = teacher_logits[:, : logits.shape[1]] if logits.ndim == 3 else teacher_logits
            loss = distillation_loss(logits, teacher, y)
        else:
            loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=-100, label_smoothing=training.label_smoothing)
        loss.backward()
        if task.teacher:
            teacher_logits = logits.detach()
            hits, count = correct_and_total(teacher_logits, y)
            teacher_stats = (float(loss.detach()), hits, count)
    return teacher_stats


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save_checkpoint(run_dir: Path, supernet: Supernet, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write ``checkpoint/`` atomically: a complete new folder replaces the old one by rename."""
    layout = RunDir(run_dir)
    target, staging, previous = layout.checkpoint, layout.checkpoint_staging, layout.checkpoint_previous
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({name: tensor.contiguous() for name, tensor in supernet.state_dict().items()}, str(staging / CHECKPOINT_WEIGHTS))
    optimizer_state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    save_file(tensors, str(staging / CHECKPOINT_OPTIMIZER))
    document = {**state, "optimizer_groups": optimizer_state["param_groups"], "optimizer_scalars": scalars, "nasforge_version": nas.__version__}
    (staging / CHECKPOINT_STATE).write_text(json.dumps(document, indent=1))
    for file in staging.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if target.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The complete checkpoint in ``run_dir`` (the previous one if a crash interrupted the swap), or None."""
    for candidate in (RunDir(run_dir).checkpoint, RunDir(run_dir).checkpoint_previous):
        if (candidate / CHECKPOINT_STATE).is_file():
            return candidate
    return None


def load_checkpoint(folder: Path, supernet: Supernet, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    supernet.load_state_dict(load_file(str(folder / CHECKPOINT_WEIGHTS)))
    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    if optimizer is not None:
        tensors = load_file(str(folder / CHECKPOINT_OPTIMIZER))
        restored: dict[int, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            restored.setdefault(int(index), {})[name] = tensor
        for index, values in state["optimizer_scalars"].items():
            restored.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": restored, "param_groups": state["optimizer_groups"]})
    return state


def load_run(run_dir: Path) -> tuple[RunConfig, Supernet, dict[str, Any]]:
    """The config and trained supernet of a run directory (for evaluation and export)."""
    config_path = RunDir(run_dir).config
    if not config_path.is_file():
        raise RunError(f"{run_dir} is not a nasforge run directory (no {CONFIG_FILE})")
    config = parse_config(config_path.read_text(), str(config_path))
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise RunError(f"{run_dir} has no checkpoint yet; train it first with `nas train`")
    supernet = Supernet(config.space)
    state = load_checkpoint(folder, supernet)
    return config, supernet, state


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
    training = config.training

    def score(arch: Arch) -> dict[str, Any]:
        results = {"arch": arch.to_dict()}
        for name, split in (("val", task_data.val), ("test", task_data.test)):
            results[name] = evaluate_arch(
                supernet, arch, task_data.train, split, batch_size=training.batch_size, calibration_batches=training.calibration_batches, seed=training.seed
            )
        return results

    metrics: dict[str, Any] = {"largest": score(config.space.largest()), "smallest": score(config.space.smallest())}
    families = family_archs(config.space)
    if len(families) > 1:
        metrics["families"] = {name: {"largest": score(large), "smallest": score(small)} for name, (large, small) in families.items()}
    return metrics


def prepare_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> int:
    """Create or check ``run_dir``; returns the number of epochs already completed (0 for a new run)."""
    config_path = RunDir(run_dir).config
    if config_path.exists():
        if config_path.read_text() != config.text:
            raise RunError(f"{run_dir} holds a run of a different space file; choose another --out")
        folder = checkpoint_dir(run_dir)
        if folder is not None and not resume:
            raise RunError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
        if folder is None:
            return 0
        return int(json.loads((folder / CHECKPOINT_STATE).read_text())["epochs_completed"])
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(config_path, config.text)
    return 0


def train(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: ProgressFactory | None = None,
    task_data: TaskData | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train the supernet of ``config`` into ``run_dir`` (see the module docstring).

    ``stop_after_epochs`` ends the call after that many epochs of this invocation (used by tests and by callers
    that train in slices); the final evaluation runs only when all epochs are done.
    """
    training = config.training
    run_dir = Path(run_dir)
    task_data = task_data or load_task_data(config.task, config.space, seed=training.seed)
    completed = prepare_run_dir(run_dir, config, resume)
    torch.manual_seed(training.seed)
    supernet = Supernet(config.space)
    optimizer = make_optimizer(supernet, training)
    state: dict[str, Any] = {"epochs_completed": 0, "train_seconds": 0.0, "history": []}
    if completed:
        state = load_checkpoint(checkpoint_dir(run_dir), supernet, optimizer)
        logger.info("resuming %s after epoch %d", run_dir, completed)
    strategy = STRATEGIES.get(training.strategy)(
        config.space, random_subnets=training.random_subnets, distill=training.distill, largest_only_epochs=training.largest_only_epochs
    )
    steps_per_epoch = max(1, len(task_data.train.targets) // training.batch_size)
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
            supernet.train()
            totals = [0.0, 0, 0]
            batches = iterate_batches(task_data.train, training.batch_size, shuffle=True, generator=generator, drop_last=True)
            for step, (inputs, targets) in enumerate(batches):
                global_step = epoch * steps_per_epoch + step
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(training, global_step, steps_per_epoch)
                if training.augment and config.space.modality == "image":
                    inputs = augment(inputs, generator)
                optimizer.zero_grad(set_to_none=True)
                loss, hits, count = train_step(supernet, strategy, training, inputs, targets, rng, epoch, step)
                optimizer.step()
                totals[0] += loss
                totals[1] += hits
                totals[2] += count
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"epoch": epoch + 1, "loss": f"{totals[0] / (step + 1):.3f}", "acc": f"{totals[1] / max(totals[2], 1):.3f}"})
            record = {"epoch": epoch + 1, "loss": totals[0] / steps_per_epoch, "train_accuracy": totals[1] / max(totals[2], 1)}
            state["history"].append(record)
            state["epochs_completed"] = epoch + 1
            state["train_seconds"] = state["train_seconds"] + time.perf_counter() - started
            save_checkpoint(run_dir, supernet, optimizer, state)
            with open(RunDir(run_dir).log, "a") as log:
                log.write(json.dumps(record) + "\n")
            logger.info("epoch %d/%d loss %.4f accuracy %.4f", epoch + 1, training.epochs, record["loss"], record["train_accuracy"])
            epochs_run += 1
    finally:
        if bar is not None:
            bar.close()
    metrics: dict[str, Any] = {}
    if state["epochs_completed"] == training.epochs:
        metrics = final_metrics(supernet, config, task_data)
        metrics["epochs"] = training.epochs
        metrics["train_seconds"] = state["train_seconds"]
        _atomic_write_text(RunDir(run_dir).metrics, json.dumps(metrics, indent=1))
    return TrainResult(run_dir, metrics, completed)


__all__ = ["RunError", "TrainResult", "load_run", "train"]
