"""Run directories and checkpoints: create or check a run folder, write a checkpoint atomically after every epoch,
find and load the newest complete one, and reload a finished run for evaluation and export.

A checkpoint (``checkpoint/`` in the run folder) holds the supernet's weights together with those of every frozen
teacher copy (under ``FROZEN_PREFIX + name + "."``), the optimizer's tensors, and ``state.json``: the loop's state
(epochs completed, history, current phase), the strategy's ``state_dict``, the optimizer's scalars and the
nasforge version.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nas
from nas import durable, jsonio
from nas.run_dir import CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, CONFIG_FILE, RunDir
from nas.space.schema import RunConfig, parse_config
from nas.supernets.strategies import STRATEGIES
from nas.supernets.supernet import Supernet

logger = logging.getLogger(__name__)

FROZEN_PREFIX = "frozen_teacher."
"""Weight names of frozen teacher copies in ``weights.safetensors`` start with this, then the copy's name and a dot."""


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists without --resume, or holds another space)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename, fsynced (``nas.durable.atomic_write_text``)."""
    durable.atomic_write_text(path, text)


def save_checkpoint(
    run_dir: Path, supernet: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], frozen: Mapping[str, nn.Module] | None = None
) -> None:
    """Write ``checkpoint/`` atomically: a complete new folder replaces the old one by rename. ``frozen``: the
    frozen teacher copies by name, stored beside the supernet's weights."""
    layout = RunDir(run_dir)
    target, staging, previous = layout.checkpoint, layout.checkpoint_staging, layout.checkpoint_previous
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = {name: tensor.contiguous() for name, tensor in supernet.state_dict().items()}
    for copy_name, copy in (frozen or {}).items():
        weights.update({f"{FROZEN_PREFIX}{copy_name}.{name}": tensor.contiguous() for name, tensor in copy.state_dict().items()})
    save_file(weights, str(staging / CHECKPOINT_WEIGHTS))
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
    (staging / CHECKPOINT_STATE).write_text(jsonio.dumps(document, indent=1))
    for file in staging.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    durable.fsync_directory(staging)
    if target.exists():
        if checkpoint_problem(target) is None:
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(target, previous)
        else:
            shutil.rmtree(target)
    os.replace(staging, target)
    durable.fsync_directory(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with the safetensors file ``path`` (None if its header parses and the file is as long as the
    header says: the format is an 8-byte little-endian header length, the JSON header, then the tensors' bytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 or header_length > size - 8:
                return f"is cut short ({size} bytes; its header alone needs {8 + header_length})"
            header = json.loads(file.read(header_length))
    except FileNotFoundError:
        return "is missing"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    except (ValueError, UnicodeDecodeError):
        return "has a header that is not valid JSON"
    if not isinstance(header, dict):
        return "has a header that is not a JSON object"
    try:
        data_end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError):
        return "has a header without valid data offsets"
    expected = 8 + header_length + data_end
    if size != expected:
        return f"is {size} bytes where its header says {expected} (cut short or damaged)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """What makes the checkpoint ``folder`` unusable, naming the file (None when it is complete): a missing or cut
    short ``weights.safetensors`` / ``optimizer.safetensors``, a ``state.json`` that does not parse or lacks
    ``epochs_completed``."""
    state = folder / CHECKPOINT_STATE
    try:
        document = json.loads(state.read_text())
    except FileNotFoundError:
        return f"{state} is missing"
    except (OSError, ValueError) as error:
        return f"{state} is not valid JSON ({error})"
    if not isinstance(document, dict) or not isinstance(document.get("epochs_completed"), int):
        return f"{state} has no integer epochs_completed"
    for name in (CHECKPOINT_WEIGHTS, CHECKPOINT_OPTIMIZER):
        problem = _safetensors_problem(folder / name)
        if problem is not None:
            return f"{folder / name} {problem}"
    return None


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The complete checkpoint in ``run_dir``: ``checkpoint/``, or the previous one (``checkpoint.old/``) when a
    crash interrupted the swap or left ``checkpoint/`` damaged (logged). None when there is none at all; a
    ``RunError`` naming the damaged file when every checkpoint there is damaged."""
    problems = []
    for candidate in (RunDir(run_dir).checkpoint, RunDir(run_dir).checkpoint_previous):
        if not candidate.exists():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            if problems:
                logger.warning("%s; using the previous checkpoint %s", problems[0], candidate)
            return candidate
        problems.append(problem)
    if problems:
        raise RunError(
            f"{run_dir} has no usable checkpoint: {'; '.join(problems)}. Move the damaged folder away and train again "
            "(`nas train --resume` starts over when no checkpoint is left)"
        )
    return None


def split_weights(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The supernet's weights, and each frozen teacher copy's weights by copy name."""
    own: dict[str, torch.Tensor] = {}
    frozen: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if name.startswith(FROZEN_PREFIX):
            copy_name, key = name.removeprefix(FROZEN_PREFIX).split(".", 1)
            frozen.setdefault(copy_name, {})[key] = tensor
        else:
            own[name] = tensor
    return own, frozen


def load_checkpoint(
    folder: Path, supernet: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Load the supernet (and optimizer) from ``folder``; returns the state document and the frozen teacher
    copies' weights by name. A damaged checkpoint is a ``RunError`` naming the file (``checkpoint_problem``)."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise RunError(f"cannot resume from {folder}: {problem}")
    weights, frozen = split_weights(load_file(str(folder / CHECKPOINT_WEIGHTS)))
    supernet.load_state_dict(weights)
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
    return state, frozen


def load_run(run_dir: Path) -> tuple[RunConfig, Supernet, dict[str, Any]]:
    """The config and trained supernet of a run directory (for evaluation and export)."""
    layout = RunDir(run_dir)
    if not layout.config.is_file():
        raise RunError(f"{run_dir} is not a nasforge run directory (no {CONFIG_FILE})")
    config = parse_config(layout.config.read_text(), str(layout.config), base_dir=layout.origin_dir(), check_constraints=False)
    folder = checkpoint_dir(run_dir)
    if folder is None:
        raise RunError(f"{run_dir} has no checkpoint yet; train it first with `nas train`")
    supernet = build_supernet(config)
    state, _ = load_checkpoint(folder, supernet)
    return config, supernet, state


def build_supernet(config: RunConfig) -> Supernet:
    """The (untrained) supernet of ``config``, built the way its training strategy builds it."""
    return STRATEGIES.get(config.training.strategy).build_supernet(config.space, config.training.strategy_options())


def first_difference(old: str, new: str) -> str:
    """Where two texts first differ, for a message: ``line 31: the run has '...', the file given has '...'``."""
    old_lines, new_lines = old.splitlines(), new.splitlines()
    for number, (before, after) in enumerate(itertools.zip_longest(old_lines, new_lines), start=1):
        if before != after:
            return f"line {number}: the run has {_clip(before)}, the file given has {_clip(after)}"
    return "they differ only in line endings or trailing whitespace"


def _clip(line: str | None) -> str:
    if line is None:
        return "no such line"
    text = line.strip()
    return repr(text if len(text) <= 100 else text[:97] + "...")


def prepare_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> int:
    """Create or check ``run_dir``; returns the number of epochs already completed (0 for a new run)."""
    layout = RunDir(run_dir)
    if layout.config.exists():
        if layout.config.read_text() != config.text:
            raise RunError(
                f"{run_dir} holds a run of a different space file ({first_difference(layout.config.read_text(), config.text)}); "
                "a run continues only with the space file it started with: restore it, or choose another --out"
            )
        folder = checkpoint_dir(run_dir)
        if folder is not None and not resume:
            raise RunError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
        if folder is None:
            return 0
        return int(json.loads((folder / CHECKPOINT_STATE).read_text())["epochs_completed"])
    run_dir.mkdir(parents=True, exist_ok=True)
    layout.record_origin(config.base_dir)
    atomic_write_text(layout.config, config.text)
    return 0


__all__ = ["FROZEN_PREFIX", "RunError", "checkpoint_dir", "load_checkpoint", "load_run", "prepare_run_dir", "save_checkpoint", "split_weights"]
