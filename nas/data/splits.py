"""What every dataset returns, and the helpers loaders share: splits, batching, stratified partitions, resizing and
per-channel normalisation.

Every loader returns a :class:`TaskData` with three :class:`Split` objects (train, val, test):

- image tasks: ``inputs`` float32 ``[N, C, H, W]`` normalised per channel with the *train* split's mean and
  standard deviation, ``targets`` int64 ``[N]``;
- sequence tasks: ``inputs`` int64 ``[N, L]`` token ids, ``targets`` int64 ``[N, L]`` holding the token to
  predict at each position, or ``-100`` (:data:`IGNORE_INDEX`) where nothing is scored.

Held-out splits that a source does not provide are carved out of its training data with
:func:`stratified_partition`, a pure function of the generator it is given. Images are brought to ``[0, 1]`` by
their loader, resized with :func:`resize_images` and normalised by :func:`image_task`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nas.supernets.blocks.base import MODALITIES

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target value at sequence positions that are not scored (the ``ignore_index`` of cross-entropy)."""


class DataError(ValueError):
    """A user-fixable problem with a dataset: the message names the path/option and what is wrong."""


@dataclass(frozen=True, slots=True)
class Split:
    """One split of a task.

    Attributes:
        inputs: image ``[N, C, H, W]`` float32, normalised; sequence ``[N, L]`` int64 token ids.
        targets: image ``[N]`` int64 class indices; sequence ``[N, L]`` int64, ``-100`` where not scored.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if self.inputs.shape[:1] != self.targets.shape[:1]:
            raise ValueError(
                f"Split.inputs and Split.targets must have the same number of samples, "
                f"got inputs {tuple(self.inputs.shape)} and targets {tuple(self.targets.shape)}"
            )


@dataclass(frozen=True, slots=True)
class TaskData:
    """A whole task: three splits plus what a model needs to know about them.

    Attributes:
        name: short name for logs and run folders (``digits``, ``mqar``, the folder or file stem, ...).
        modality: ``"image"`` or ``"sequence"``.
        train, val, test: the splits (see :class:`Split` for shapes).
        num_classes: number of output classes (for sequences: the vocabulary size).
        input_shape: image ``(C, H, W)``; sequence ``(L,)``.
        vocab_size: number of token ids, sequence tasks only.
    """

    name: str
    modality: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"TaskData.modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if self.modality == "sequence" and self.vocab_size is None:
            raise ValueError("TaskData.vocab_size is required when modality is 'sequence'")


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rows: slice | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` mini-batches that cover ``split`` once.

    Batches are ``inputs[B, ...]`` and ``targets[B, ...]`` with ``B == batch_size`` except possibly the last
    (dropped when ``drop_last``). With ``shuffle`` the order is ``torch.randperm`` drawn from ``generator``
    (the global torch generator when it is ``None``); without it, batches are views in dataset order.

    ``rows`` keeps only those rows of every batch (a data-parallel worker's share of the global batch; only the
    kept samples are gathered): every worker draws the same order and trains its own part of each batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    count = int(split.inputs.shape[0])
    stop = count - count % batch_size if drop_last else count
    order = torch.randperm(count, generator=generator) if shuffle else None
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, stop)
        if order is None:
            inputs, targets = split.inputs[start:end], split.targets[start:end]
            yield (inputs, targets) if rows is None else (inputs[rows], targets[rows])
        else:
            index = order[start:end] if rows is None else order[start:end][rows]
            yield split.inputs[index], split.targets[index]


def check_positive_int(option: str, value: object) -> None:
    """Raise ``DataError`` unless ``value`` is an integer >= 1 (``option`` names it in the message)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{option} must be a positive integer, got {value!r}")


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``DataError`` unless both fractions lie in ``[0, 1)`` and leave training data."""
    for option, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise DataError(f"{option} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be below 1 to leave training data, got {val_fraction} + {test_fraction}")


def stratified_partition(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator, source: str) -> list[np.ndarray]:
    """Split sample indices into ``[train, held_out_1, ...]``, stratified by ``labels [N]``.

    Held-out part ``k`` gets ``round(fractions[k] * N)`` samples (at least 1 when the fraction is positive),
    shared among classes in proportion to their size by largest remainder, never taking a class's last
    sample away from train. Each part's indices are sorted ascending. ``source`` names the data in errors.
    """
    count = labels.shape[0]
    if count == 0:
        raise DataError(f"{source}: no samples to split")
    _, inverse, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    shuffled = [rng.permutation(np.flatnonzero(inverse == index)) for index in range(class_counts.shape[0])]
    available = class_counts - 1
    taken = np.zeros_like(class_counts)
    parts: list[np.ndarray] = []
    for fraction in fractions:
        size = 0 if fraction == 0 else max(1, int(math.floor(fraction * count + 0.5)))
        quota = class_counts * (size / count)
        allocation = np.minimum(np.floor(quota).astype(np.int64), available)
        order = np.lexsort((rng.random(class_counts.shape[0]), -(quota - allocation)))
        for _ in range(size):
            missing = size - int(allocation.sum())
            if missing <= 0:
                break
            candidates = order[allocation[order] < available[order]][:missing]
            if candidates.size == 0:
                raise DataError(
                    f"{source}: too few samples ({count} in {class_counts.shape[0]} classes) to hold out "
                    f"{size} for a fraction of {fraction} while keeping every class in train; lower the "
                    f"fraction or add data"
                )
            allocation[candidates] += 1
        part = [shuffled[index][taken[index] : taken[index] + allocation[index]] for index in range(len(shuffled))]
        parts.append(np.sort(np.concatenate(part)) if part else np.empty(0, dtype=np.int64))
        taken += allocation
        available -= allocation
    train = np.sort(np.concatenate([indices[taken[index] :] for index, indices in enumerate(shuffled)]))
    return [train, *parts]


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, antialiased when shrinking): ``[N, C, H, W] -> [N, C, R, R]``."""
    height, width = images.shape[-2:]
    if (height, width) == (resolution, resolution):
        return images
    shrinking = height > resolution or width > resolution
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrinking)


def image_task(
    name: str,
    train: tuple[torch.Tensor, np.ndarray],
    val: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    num_classes: int,
) -> TaskData:
    """Build an image :class:`TaskData` from ``(images [N, C, H, W] float in [0, 1], labels [N])`` per split.

    Every split is normalised per channel with the train split's mean and standard deviation (a channel with
    zero deviation is only centred).
    """
    train_images = train[0].to(torch.float32)
    if train_images.shape[0] == 0:
        raise DataError(f"{name}: the train split is empty")
    mean = train_images.to(torch.float64).mean(dim=(0, 2, 3))
    std = train_images.to(torch.float64).std(dim=(0, 2, 3), correction=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    mean32, std32 = mean.to(torch.float32)[None, :, None, None], std.to(torch.float32)[None, :, None, None]

    def make_split(pair: tuple[torch.Tensor, np.ndarray]) -> Split:
        images = ((pair[0].to(torch.float32) - mean32) / std32).contiguous()
        return Split(inputs=images, targets=torch.as_tensor(np.asarray(pair[1], dtype=np.int64)).clone())

    splits = [make_split(pair) for pair in (train, val, test)]
    logger.info(
        "%s: %d/%d/%d train/val/test images of shape %s, %d classes, channel mean %s std %s",
        name,
        *(int(split.targets.shape[0]) for split in splits),
        tuple(train_images.shape[1:]),
        num_classes,
        [round(value, 4) for value in mean.tolist()],
        [round(value, 4) for value in std.tolist()],
    )
    return TaskData(
        name=name,
        modality="image",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=num_classes,
        input_shape=tuple(int(size) for size in train_images.shape[1:]),
    )
