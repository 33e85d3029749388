"""The datasets that need no files: scikit-learn's bundled digits (the embedded quickstart) and the synthetic
multi-query associative recall task (MQAR, Zoology, Arora et al. 2023). Both register in ``DATASETS`` below.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from nas.data.registry import register_dataset
from nas.data.splits import (
    IGNORE_INDEX,
    DataError,
    Split,
    TaskData,
    check_positive_int,
    image_task,
    resize_images,
    stratified_partition,
)

if TYPE_CHECKING:
    from nas.space.schema import TaskModel
    from nas.supernets.space import SearchSpace

logger = logging.getLogger(__name__)

_MAX_SAMPLING_ELEMENTS = 1 << 22


def load_digits(resolution: int = 32, seed: int = 0) -> TaskData:
    """scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes), no network needed.

    A stratified 70/15/15 train/val/test split drawn from ``seed``; pixels (0..16) are scaled to ``[0, 1]``,
    resized to ``resolution`` and normalised with the train split's mean and std.

    Returns:
        image :class:`TaskData` named ``digits``; inputs ``[N, 1, resolution, resolution]``, ``N`` being
        1257 / 270 / 270.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    check_positive_int("resolution", resolution)
    bunch = sklearn_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_index, val_index, test_index = stratified_partition(labels, (0.15, 0.15), np.random.default_rng(seed), "digits")
    images = resize_images(images, resolution)
    return image_task(
        "digits",
        (images[train_index], labels[train_index]),
        (images[val_index], labels[val_index]),
        (images[test_index], labels[test_index]),
        num_classes=10,
    )


def make_mqar(
    sequence_length: int,
    num_kv_pairs: int,
    vocab_size: int,
    num_train: int,
    num_val: int,
    num_test: int,
    seed: int = 0,
    power_a: float = 0.01,
) -> TaskData:
    """Multi-query associative recall, following Zoology's ``multiquery_ar`` generator.

    One example (``sequence_length=16, num_kv_pairs=2, vocab_size=12``; ``.`` is a filler position)::

        inputs:   2    8    4    7    .    .    4    .    .    .    .    .    2    .    .    .
        targets: -100 -100 -100 -100 -100 -100  7   -100 -100 -100 -100 -100  8   -100 -100 -100

    - The first ``2 * num_kv_pairs`` positions hold ``k1 v1 k2 v2 ...``: distinct keys drawn uniformly from
      ``[1, vocab_size // 2)`` and distinct values from ``[vocab_size // 2, vocab_size)``; token 0 is never a
      key or a value.
    - Each key appears once more as a query at position ``2 * num_kv_pairs + 2 * gap``, with the gaps drawn
      without replacement from ``range((sequence_length - 2 * num_kv_pairs) // 2)`` with probability
      proportional to ``(gap + 1) ** (power_a - 1)`` (0.01, Zoology's default, keeps most queries close to
      the prefix; 1.0 is uniform). The i-th pair of the prefix takes the i-th gap drawn, as in Zoology.
    - The target at a query position is the value bound to that key (next-token prediction: the value itself
      never appears in the input after the query). Every other target is ``-100``.
    - Filler positions hold tokens drawn uniformly from ``[0, vocab_size)``: Zoology's
      ``random_non_queries=True``, the default of its ``MQARConfig``. A filler can therefore repeat a key; its
      target stays ``-100``.

    Differences from Zoology: randomness comes from ``numpy.random.Generator`` (train, val and test each
    from their own child of ``SeedSequence(seed)``, so changing ``num_train`` leaves val and test unchanged),
    sampling without replacement uses the Gumbel-top-k trick (the same distribution as sequential
    ``choice(replace=False, p=...)``), and Zoology's ``vocab_size >= input_seq_len`` and even-length
    assertions are replaced by the conditions the construction actually needs.

    Returns:
        sequence :class:`TaskData` named ``mqar``; inputs and targets int64 ``[N, sequence_length]``,
        ``num_classes == vocab_size``.

    Raises:
        DataError: listing every infeasible or invalid argument at once.
    """
    problems = []
    for option, value in (
        ("sequence_length", sequence_length),
        ("num_kv_pairs", num_kv_pairs),
        ("vocab_size", vocab_size),
        ("num_train", num_train),
        ("num_val", num_val),
        ("num_test", num_test),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            problems.append(f"{option} must be a positive integer, got {value!r}")
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not (math.isfinite(power_a) and power_a > 0):
        problems.append(f"power_a must be a positive finite number, got {power_a!r}")
    if not problems:
        if 4 * num_kv_pairs > sequence_length:
            problems.append(
                f"sequence_length must be at least 4 * num_kv_pairs = {4 * num_kv_pairs} (the key-value prefix "
                f"takes 2 * num_kv_pairs positions and every key needs its own query slot at an even offset "
                f"after it), got sequence_length={sequence_length} with num_kv_pairs={num_kv_pairs}"
            )
        if vocab_size // 2 - 1 < num_kv_pairs:
            problems.append(
                f"vocab_size must be at least 2 * (num_kv_pairs + 1) = {2 * (num_kv_pairs + 1)} so that "
                f"num_kv_pairs={num_kv_pairs} distinct keys fit in [1, vocab_size // 2), got vocab_size={vocab_size}"
            )
    if problems:
        raise DataError("make_mqar: " + "; ".join(problems))

    sequence_length, num_kv_pairs, vocab_size = int(sequence_length), int(num_kv_pairs), int(vocab_size)
    children = np.random.SeedSequence(seed).spawn(3)
    splits = [
        _mqar_split(int(count), sequence_length, num_kv_pairs, vocab_size, float(power_a), np.random.default_rng(child))
        for count, child in zip((num_train, num_val, num_test), children, strict=True)
    ]
    logger.info(
        "mqar: sequence_length=%d num_kv_pairs=%d vocab_size=%d power_a=%g, %d/%d/%d examples",
        sequence_length,
        num_kv_pairs,
        vocab_size,
        power_a,
        num_train,
        num_val,
        num_test,
    )
    return TaskData(
        name="mqar",
        modality="sequence",
        train=splits[0],
        val=splits[1],
        test=splits[2],
        num_classes=vocab_size,
        input_shape=(sequence_length,),
        vocab_size=vocab_size,
    )


def _mqar_split(
    num_examples: int,
    sequence_length: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float,
    rng: np.random.Generator,
) -> Split:
    """Generate ``num_examples`` MQAR sequences: inputs and targets int64 ``[num_examples, sequence_length]``."""
    context_size = 2 * num_kv_pairs
    key_vocab_size = vocab_size // 2
    keys = 1 + _uniform_sample_without_replacement(rng, key_vocab_size - 1, num_examples, num_kv_pairs)
    values = key_vocab_size + _uniform_sample_without_replacement(rng, vocab_size - key_vocab_size, num_examples, num_kv_pairs)
    space = (sequence_length - context_size) // 2
    log_weights = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = _weighted_sample_without_replacement(rng, log_weights, num_examples, num_kv_pairs)

    inputs = rng.integers(0, vocab_size, size=(num_examples, sequence_length), dtype=np.int64)
    targets = np.full((num_examples, sequence_length), IGNORE_INDEX, dtype=np.int64)
    inputs[:, 0:context_size:2] = keys
    inputs[:, 1:context_size:2] = values
    query_positions = context_size + 2 * gaps
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    np.put_along_axis(targets, query_positions, values, axis=1)
    return Split(inputs=torch.from_numpy(inputs), targets=torch.from_numpy(targets))


def _uniform_sample_without_replacement(rng: np.random.Generator, population: int, rows: int, size: int) -> np.ndarray:
    """Per row, ``size`` distinct integers of ``range(population)`` in uniformly random order: int64 ``[rows, size]``.

    Robert Floyd's algorithm, vectorised over rows (``size`` steps, each one draw per row), followed by a
    per-row shuffle because Floyd's order is not uniform.
    """
    result = np.empty((rows, size), dtype=np.int64)
    chunk = max(1, _MAX_SAMPLING_ELEMENTS // population)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        row_index = np.arange(stop - start)
        chosen = np.zeros((stop - start, population), dtype=bool)
        for column, upper in enumerate(range(population - size, population)):
            candidate = rng.integers(0, upper + 1, size=stop - start)
            pick = np.where(chosen[row_index, candidate], upper, candidate)
            chosen[row_index, pick] = True
            result[start:stop, column] = pick
    return rng.permuted(result, axis=1)


def _weighted_sample_without_replacement(rng: np.random.Generator, log_weights: np.ndarray, rows: int, size: int) -> np.ndarray:
    """Per row, draw ``size`` distinct indices of ``log_weights [K]`` with probability ~ ``exp(log_weights)``.

    Gumbel-top-k: the indices of the ``size`` largest ``log_weights + Gumbel noise``, in decreasing order,
    have the distribution of sequential weighted sampling without replacement. Returns int64 ``[rows, size]``.
    """
    population = log_weights.shape[0]
    result = np.empty((rows, size), dtype=np.int64)
    chunk = max(1, _MAX_SAMPLING_ELEMENTS // population)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        scores = log_weights + rng.gumbel(size=(stop - start, population))
        top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        result[start:stop] = np.take_along_axis(top, order, axis=1)
    return result


@register_dataset("digits", modality="image", channels=1, num_classes=10)
def digits_for_task(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
    """scikit-learn's bundled 8x8 handwritten digits, resized to task.input_shape[1] (no files, no network)."""
    return load_digits(resolution=task.input_shape[1], seed=seed)


@register_dataset("mqar", modality="sequence", requires=("vocab_size", "num_kv_pairs"))
def mqar_for_task(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
    """Synthetic multi-query associative recall, task.input_shape[0] tokens long (no files, no network)."""
    if task.vocab_size is None or task.num_kv_pairs is None:
        raise DataError("task.vocab_size and task.num_kv_pairs are required for the mqar dataset")
    loaded = make_mqar(
        sequence_length=task.input_shape[0],
        num_kv_pairs=task.num_kv_pairs,
        vocab_size=task.vocab_size,
        num_train=task.num_train,
        num_val=task.num_val,
        num_test=task.num_test,
        seed=seed,
    )
    shortest = min(space.sequence_lengths)
    if 2 * task.num_kv_pairs >= shortest:
        raise DataError(f"sequence_length {shortest} leaves no room for queries after {task.num_kv_pairs} key-value pairs")
    return loaded
