"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 from files already on disk (as torchvision keeps them), read
without torchvision and never downloaded. Each registers in ``DATASETS`` under its name below; ``task.path`` is the
root folder (default: the current folder).
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nas.data.registry import DatasetLoader, register_dataset
from nas.data.splits import (
    DataError,
    TaskData,
    check_fractions,
    check_positive_int,
    image_task,
    resize_images,
    stratified_partition,
)
from nas.supernets.registry import did_you_mean

if TYPE_CHECKING:
    from nas.space.schema import TaskModel
    from nas.supernets.space import SearchSpace

_ON_DISK = {
    "mnist": (1, 10, "MNIST handwritten digits, IDX files in <task.path>/MNIST/raw"),
    "fashion_mnist": (1, 10, "Fashion-MNIST, IDX files in <task.path>/FashionMNIST/raw"),
    "cifar10": (3, 10, "CIFAR-10, python pickles in <task.path>/cifar-10-batches-py"),
    "cifar100": (3, 100, "CIFAR-100 (fine labels), python pickles in <task.path>/cifar-100-python"),
}
"""name -> (channels, classes, description) of every dataset this module reads."""

TORCHVISION_DATASETS = tuple(_ON_DISK)
"""Names accepted by :func:`load_torchvision_on_disk`."""


def load_torchvision_on_disk(
    name: str,
    root: str | Path,
    resolution: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100 from the files torchvision keeps, without torchvision.

    ``name`` is one of :data:`TORCHVISION_DATASETS`, case-insensitive (``-`` and ``_`` are ignored, so
    ``FashionMNIST`` and ``CIFAR-10`` work). Files read (nasforge never downloads them):

    - MNIST / Fashion-MNIST: ``root/MNIST/raw/`` (or ``root/FashionMNIST/raw/``) ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
      ending in ``.gz``;
    - CIFAR-10: ``root/cifar-10-batches-py/data_batch_1`` .. ``data_batch_5`` and ``test_batch``;
    - CIFAR-100: ``root/cifar-100-python/train`` and ``test`` (fine labels).

    CIFAR pickles are read with an unpickler that only admits NumPy arrays, so a tampered file cannot run
    code. The official test set is the test split; val is a stratified ``val_fraction`` of the official
    training set drawn from ``seed``.

    Returns:
        image :class:`TaskData` named after the canonical dataset name; inputs ``[N, 1, 28, 28]`` (MNIST
        kinds) or ``[N, 3, 32, 32]`` (CIFAR kinds), or ``resolution`` square when given.
    """
    canonical = _canonical_dataset_name(name)
    if resolution is not None:
        check_positive_int("resolution", resolution)
    check_fractions(val_fraction, 0.0)
    base = Path(root)
    if canonical in ("mnist", "fashion_mnist"):
        folder = base / ("MNIST" if canonical == "mnist" else "FashionMNIST") / "raw"
        train_images = _read_idx(_find_file(folder, "train-images-idx3-ubyte", canonical), 3)
        train_labels = _read_idx(_find_file(folder, "train-labels-idx1-ubyte", canonical), 1)
        test_images = _read_idx(_find_file(folder, "t10k-images-idx3-ubyte", canonical), 3)
        test_labels = _read_idx(_find_file(folder, "t10k-labels-idx1-ubyte", canonical), 1)
        train_images, test_images = train_images[:, None], test_images[:, None]
        num_classes = 10
    else:
        if canonical == "cifar10":
            folder = base / "cifar-10-batches-py"
            train_files, test_files, label_key, num_classes = ([f"data_batch_{index}" for index in range(1, 6)], ["test_batch"], "labels", 10)
        else:
            folder = base / "cifar-100-python"
            train_files, test_files, label_key, num_classes = ["train"], ["test"], "fine_labels", 100
        train_images, train_labels = _read_cifar(folder, train_files, label_key, canonical)
        test_images, test_labels = _read_cifar(folder, test_files, label_key, canonical)

    for images, labels, split in ((train_images, train_labels, "train"), (test_images, test_labels, "test")):
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{folder}: the {split} files hold {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{folder}: {split} labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}")

    train_labels = train_labels.astype(np.int64)
    test_labels = test_labels.astype(np.int64)
    train_tensor = torch.from_numpy(train_images.astype(np.float32) / 255.0)
    test_tensor = torch.from_numpy(test_images.astype(np.float32) / 255.0)
    train_index, val_index = stratified_partition(train_labels, (val_fraction,), np.random.default_rng(seed), str(folder))
    if resolution is not None:
        train_tensor, test_tensor = resize_images(train_tensor, resolution), resize_images(test_tensor, resolution)
    return image_task(
        canonical,
        (train_tensor[train_index], train_labels[train_index]),
        (train_tensor[val_index], train_labels[val_index]),
        (test_tensor, test_labels),
        num_classes=num_classes,
    )


def _canonical_dataset_name(name: str) -> str:
    aliases = {known.replace("_", ""): known for known in TORCHVISION_DATASETS}
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else ""
    if key in aliases:
        return aliases[key]
    hint = did_you_mean(str(name).lower(), TORCHVISION_DATASETS)
    raise DataError(f"dataset name must be one of {list(TORCHVISION_DATASETS)}, got {name!r}{hint}")


def _missing_file_error(expected: str, dataset: str) -> DataError:
    return DataError(
        f"{dataset}: expected file {expected} is missing; nasforge never downloads datasets, so place the "
        f"files there yourself (for example with torchvision's download=True, once, on a machine with network)"
    )


def _find_file(folder: Path, file_name: str, dataset: str) -> Path:
    for candidate in (folder / file_name, folder / f"{file_name}.gz"):
        if candidate.is_file():
            return candidate
    raise _missing_file_error(f"{folder / file_name} (or {file_name}.gz)", dataset)


def _read_idx(file: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format), gzipped or not: ``[N, H, W]`` or ``[N]`` uint8."""
    try:
        data = file.read_bytes()
        if file.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{file}: cannot read IDX file ({error})") from error
    header_size = 4 + 4 * ndim
    if len(data) < header_size or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != ndim:
        raise DataError(f"{file}: not an unsigned-byte IDX file with {ndim} dimension(s) (magic {data[:4].hex() or 'empty'}, expected 000008{ndim:02x})")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = math.prod(shape)
    if len(data) - header_size != expected:
        raise DataError(f"{file}: IDX header promises shape {shape} ({expected} bytes) but the file holds {len(data) - header_size} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits only what pickled NumPy arrays need, so a tampered file cannot run code."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar(folder: Path, file_names: Sequence[str], label_key: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python pickles: images uint8 ``[N, 3, 32, 32]`` and labels ``[N]``."""
    images, labels = [], []
    for file_name in file_names:
        file = folder / file_name
        if not file.is_file():
            raise _missing_file_error(str(file), dataset)
        try:
            with file.open("rb") as stream:
                batch = _ArrayOnlyUnpickler(stream, encoding="latin1").load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            raise DataError(f"{file}: cannot read CIFAR pickle ({error})") from error
        if not isinstance(batch, dict):
            raise DataError(f"{file}: expected a pickled dict, got {type(batch).__name__}")
        entries = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
        for key in ("data", label_key):
            if key not in entries:
                raise DataError(f"{file}: missing key {key!r}; keys present: {sorted(map(str, entries))}")
        data = np.asarray(entries["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{file}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        batch_labels = np.asarray(entries[label_key])
        if batch_labels.shape != (data.shape[0],) or not np.issubdtype(batch_labels.dtype, np.integer):
            raise DataError(f"{file}: {label_key!r} must hold {data.shape[0]} integers, got {batch_labels.dtype} {batch_labels.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _loader(name: str) -> DatasetLoader:
    """The registered loader of ``name``: its files under ``task.path`` (default: the current folder)."""

    def load(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
        return load_torchvision_on_disk(name, task.path or ".", task.input_shape[1], val_fraction=task.val_fraction, seed=seed)

    return load


def _register() -> None:
    for name, (channels, num_classes, description) in _ON_DISK.items():
        register_dataset(name, modality="image", channels=channels, num_classes=num_classes, description=description)(_loader(name))


_register()
