"""Datasets for nasforge, all held in memory as tensors.

Every loader returns a :class:`TaskData` with three :class:`Split` objects (train, val, test):

- image tasks: ``inputs`` float32 ``[N, C, H, W]`` normalised per channel with the *train* split's mean and
  standard deviation, ``targets`` int64 ``[N]``;
- sequence tasks: ``inputs`` int64 ``[N, L]`` token ids, ``targets`` int64 ``[N, L]`` holding the token to
  predict at each position, or ``-100`` (:data:`IGNORE_INDEX`) where nothing is scored.

Sources (none of them ever touches the network):

- :func:`load_digits`: scikit-learn's bundled 8x8 handwritten digits, the embedded quickstart dataset;
- :func:`make_mqar`: synthetic multi-query associative recall (Zoology, Arora et al. 2023);
- :func:`load_image_folder`: one subfolder per class holding ``.npy``, binary PGM/PPM or PNG files, read
  without Pillow (PNG through a small stdlib ``zlib`` decoder);
- :func:`load_npz`: image arrays in a NumPy ``.npz`` archive;
- :func:`load_torchvision_on_disk`: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 files that torchvision (or
  anything else) already downloaded, read without importing torchvision.

Held-out splits that a source does not provide are carved out of its training data with a stratified split
that is a pure function of ``seed``. Pixel values are first brought to ``[0, 1]`` (uint8 / 255,
uint16 / 65535, PGM/PPM sample / maxval; floating arrays are taken as they are), then resized with bilinear
interpolation (``align_corners=False``, antialiased when shrinking), then normalised.
"""

from __future__ import annotations

import difflib
import gzip
import logging
import math
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target value at sequence positions that are not scored (the ``ignore_index`` of cross-entropy)."""

IMAGE_SUFFIXES = (".npy", ".pgm", ".ppm", ".pnm", ".png")
"""File name endings that :func:`load_image_folder` reads (compared case-insensitively)."""

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
"""Names accepted by :func:`load_torchvision_on_disk`."""

_MAX_SAMPLING_ELEMENTS = 1 << 22
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


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
        if self.modality not in ("image", "sequence"):
            raise ValueError(f"TaskData.modality must be one of ['image', 'sequence'], got {self.modality!r}")
        if self.modality == "sequence" and self.vocab_size is None:
            raise ValueError("TaskData.vocab_size is required when modality is 'sequence'")


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, targets)`` mini-batches that cover ``split`` once.

    Batches are ``inputs[B, ...]`` and ``targets[B, ...]`` with ``B == batch_size`` except possibly the last
    (dropped when ``drop_last``). With ``shuffle`` the order is ``torch.randperm`` drawn from ``generator``
    (the global torch generator when it is ``None``); without it, batches are views in dataset order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    count = int(split.inputs.shape[0])
    stop = count - count % batch_size if drop_last else count
    order = torch.randperm(count, generator=generator) if shuffle else None
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, stop)
        if order is None:
            yield split.inputs[start:end], split.targets[start:end]
        else:
            index = order[start:end]
            yield split.inputs[index], split.targets[index]


def load_digits(resolution: int = 32, seed: int = 0) -> TaskData:
    """scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes), no network needed.

    A stratified 70/15/15 train/val/test split drawn from ``seed``; pixels (0..16) are scaled to ``[0, 1]``,
    resized to ``resolution`` and normalised with the train split's mean and std.

    Returns:
        image :class:`TaskData` named ``digits``; inputs ``[N, 1, resolution, resolution]``, ``N`` being
        1257 / 270 / 270.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    _check_positive_int("resolution", resolution)
    bunch = sklearn_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_index, val_index, test_index = _stratified_partition(
        labels, (0.15, 0.15), np.random.default_rng(seed), "digits"
    )
    images = _resize(images, resolution)
    return _image_task(
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
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not (
        math.isfinite(power_a) and power_a > 0
    ):
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
        sequence_length, num_kv_pairs, vocab_size, power_a, num_train, num_val, num_test,
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


def load_image_folder(
    path: str | Path,
    resolution: int,
    channels: int = 3,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """Images in one subfolder per class (``path/<class>/**/<image>``), read without Pillow.

    Classes are the non-hidden subfolders of ``path``, sorted by name; class ``i`` is the ``i``-th. Files
    are found recursively inside each class folder; hidden files are ignored and files with other endings
    are skipped with a warning. Readable formats:

    - ``.npy``: one array ``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4; an alpha channel is dropped), dtype
      uint8, uint16, bool or floating (floating values are used as they are);
    - ``.pgm`` / ``.ppm`` / ``.pnm``: binary PGM (P5) or PPM (P6), maxval up to 65535;
    - ``.png``: non-interlaced, 8- or 16-bit grey, grey+alpha, RGB or RGBA (no palette images).

    Grey images are repeated to 3 channels when ``channels == 3``; colour images become grey with the
    ITU-R 601 luma weights when ``channels == 1``. Each image is resized to ``resolution x resolution``,
    the split is stratified by class and drawn from ``seed``, and the normalisation uses the train split.

    Returns:
        image :class:`TaskData` named after the folder; inputs ``[N, channels, resolution, resolution]``.
    """
    root = Path(path)
    _check_positive_int("resolution", resolution)
    if channels not in (1, 3):
        raise DataError(f"channels must be one of [1, 3], got {channels!r}")
    _check_fractions(val_fraction, test_fraction)
    if not root.exists():
        raise DataError(f"{root}: image folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder with one subfolder per class, got a file")
    class_dirs = sorted((entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
                        key=lambda entry: entry.name)
    if not class_dirs:
        raise DataError(
            f"{root}: no class subfolders; expected one subfolder per class, e.g. {root / 'cat' / '0001.png'}"
        )
    if len(class_dirs) < 2:
        raise DataError(
            f"{root}: found a single class subfolder {class_dirs[0].name!r}; a classification task needs at "
            f"least 2 (point path at the folder that holds one subfolder per class)"
        )

    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            entry for entry in class_dir.rglob("*")
            if entry.is_file() and not any(part.startswith(".") for part in entry.relative_to(class_dir).parts)
        )
        readable = [entry for entry in files if entry.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [entry for entry in files if entry.suffix.lower() not in IMAGE_SUFFIXES]
        if not readable:
            found = f"; found only {len(skipped)} other file(s) such as {skipped[0].name!r}" if skipped else ""
            raise DataError(
                f"{class_dir}: class folder has no readable images (readable endings: {', '.join(IMAGE_SUFFIXES)})"
                f"{found}"
            )
        if skipped:
            logger.warning(
                "%s: skipped %d file(s) that are not %s, e.g. %s",
                class_dir, len(skipped), "/".join(IMAGE_SUFFIXES), skipped[0].name,
            )
        for file in readable:
            image = _convert_channels(_read_image_file(file), channels)
            images.append(_resize(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0), resolution)[0])
            labels.append(label)

    label_array = np.asarray(labels, dtype=np.int64)
    stacked = torch.stack(images)
    partition = _stratified_partition(
        label_array, (val_fraction, test_fraction), np.random.default_rng(seed), str(root)
    )
    logger.info("%s: classes %s", root, ", ".join(f"{index}={entry.name}" for index, entry in enumerate(class_dirs)))
    return _image_task(
        root.resolve().name,
        *((stacked[index], label_array[index]) for index in partition),
        num_classes=len(class_dirs),
    )


def load_npz(
    path: str | Path,
    resolution: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """Image classification arrays from a NumPy ``.npz`` archive (images only; no sequence data).

    Keys: ``x_train``, ``y_train`` and optionally ``x_val``, ``y_val``, ``x_test``, ``y_test``. A missing
    val (or test) pair is carved out of the training data, stratified, with ``val_fraction`` (or
    ``test_fraction``) of it; the fraction of a pair that is present is ignored.

    - images: uint8, uint16, bool or floating; ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]`` with
      C in 1, 3. Layout is detected from which axis has size 1 or 3; when both axis 1 and axis 3 do,
      ``[N, C, H, W]`` is assumed and a warning logged.
    - labels: integer ``[N]``, non-negative; ``num_classes`` is the largest label + 1.

    ``resolution=None`` keeps the stored size (all splits must then share it); otherwise every image is
    resized to ``resolution x resolution``.

    Returns:
        image :class:`TaskData` named after the file stem; inputs ``[N, C, H, W]``.
    """
    file = Path(path)
    if resolution is not None:
        _check_positive_int("resolution", resolution)
    if not file.exists():
        raise DataError(f"{file}: .npz file does not exist")
    if not file.is_file():
        raise DataError(f"{file}: expected a .npz file, got a folder")
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{file}: expected a .npz archive (numpy.savez), got a single .npy array")
        with loaded as archive:
            arrays = {key: archive[key] for key in archive.files}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{file}: cannot read as a .npz archive ({error})") from error

    present = sorted(arrays)
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise DataError(f"{file}: missing required key {key!r}; keys present: {present}")
    for name in ("val", "test"):
        has_x, has_y = f"x_{name}" in arrays, f"y_{name}" in arrays
        if has_x != has_y:
            missing = f"y_{name}" if has_x else f"x_{name}"
            raise DataError(f"{file}: {missing!r} is missing while its pair is present; keys present: {present}")

    pairs: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for name in ("train", "val", "test"):
        if f"x_{name}" not in arrays:
            continue
        images = _npz_images(arrays[f"x_{name}"], f"{file}:x_{name}")
        labels = _npz_labels(arrays[f"y_{name}"], f"{file}:y_{name}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{file}: x_{name} has {images.shape[0]} images but y_{name} has {labels.shape[0]} labels"
            )
        if images.shape[0] == 0:
            raise DataError(f"{file}: x_{name} is empty")
        pairs[name] = (images, labels)

    shapes = {name: tuple(images.shape[1:]) for name, (images, _) in pairs.items()}
    if len({shape[0] for shape in shapes.values()}) > 1:
        raise DataError(f"{file}: splits disagree on the number of channels: {shapes}")
    if resolution is None and len(set(shapes.values())) > 1:
        raise DataError(f"{file}: splits have different image sizes {shapes}; pass a resolution to resize them")

    train_images, train_labels = pairs["train"]
    held_out = [name for name in ("val", "test") if name not in pairs]
    if held_out:
        fractions = {"val": val_fraction, "test": test_fraction}
        _check_fractions(*(fractions[name] if name in held_out else 0.0 for name in ("val", "test")))
        train_index, *held_out_index = _stratified_partition(
            train_labels, [fractions[name] for name in held_out], np.random.default_rng(seed), str(file)
        )
        for name, index in zip(held_out, held_out_index, strict=True):
            pairs[name] = (train_images[index], train_labels[index])
        pairs["train"] = (train_images[train_index], train_labels[train_index])

    if resolution is not None:
        pairs = {name: (_resize(images, resolution), labels) for name, (images, labels) in pairs.items()}
    num_classes = int(max(labels.max(initial=-1) for _, labels in pairs.values())) + 1
    return _image_task(file.stem, pairs["train"], pairs["val"], pairs["test"], num_classes=num_classes)


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
        _check_positive_int("resolution", resolution)
    _check_fractions(val_fraction, 0.0)
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
            train_files, test_files, label_key, num_classes = (
                [f"data_batch_{index}" for index in range(1, 6)], ["test_batch"], "labels", 10
            )
        else:
            folder = base / "cifar-100-python"
            train_files, test_files, label_key, num_classes = ["train"], ["test"], "fine_labels", 100
        train_images, train_labels = _read_cifar(folder, train_files, label_key, canonical)
        test_images, test_labels = _read_cifar(folder, test_files, label_key, canonical)

    for images, labels, split in ((train_images, train_labels, "train"), (test_images, test_labels, "test")):
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{folder}: the {split} files hold {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(
                f"{folder}: {split} labels must lie in [0, {num_classes}), "
                f"found {int(labels.min())}..{int(labels.max())}"
            )

    train_labels = train_labels.astype(np.int64)
    test_labels = test_labels.astype(np.int64)
    train_tensor = torch.from_numpy(train_images.astype(np.float32) / 255.0)
    test_tensor = torch.from_numpy(test_images.astype(np.float32) / 255.0)
    train_index, val_index = _stratified_partition(
        train_labels, (val_fraction,), np.random.default_rng(seed), str(folder)
    )
    if resolution is not None:
        train_tensor, test_tensor = _resize(train_tensor, resolution), _resize(test_tensor, resolution)
    return _image_task(
        canonical,
        (train_tensor[train_index], train_labels[train_index]),
        (train_tensor[val_index], train_labels[val_index]),
        (test_tensor, test_labels),
        num_classes=num_classes,
    )


def _read_image_file(path: str | Path) -> np.ndarray:
    """Read one image file (``.npy``, binary PGM/PPM, PNG) as float32 ``[H, W, C]`` with C in 1, 3.

    Integer samples are scaled to ``[0, 1]`` (divided by 255, 65535 or the PGM/PPM maxval); floating
    ``.npy`` arrays are returned as they are. An alpha channel is dropped.

    Raises:
        DataError: naming the file when it cannot be read or is not a supported image.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise DataError(f"{file}: unsupported image file ending {suffix!r}; readable: {', '.join(IMAGE_SUFFIXES)}")
    if suffix == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f"{file}: cannot read as a .npy array ({error})") from error
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
            raise DataError(
                f"{file}: a .npy image must have shape [H, W] or [H, W, C] with C in 1, 3, 4, got {array.shape}"
            )
        image = _to_unit_range(array, str(file))
    else:
        try:
            data = file.read_bytes()
        except OSError as error:
            raise DataError(f"{file}: cannot read file ({error})") from error
        image = _decode_png(data, str(file)) if suffix == ".png" else _decode_pnm(data, str(file))
    if image.shape[2] in (2, 4):
        image = image[:, :, : image.shape[2] - 1]
    return np.ascontiguousarray(image, dtype=np.float32)


def _decode_pnm(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode a binary PGM (P5) or PPM (P6) image to float32 ``[H, W, C]`` in ``[0, 1]`` (C = 1 or 3)."""
    magic = data[:2]
    if magic not in (b"P5", b"P6"):
        kind = "a plain-text or bitmap PNM" if magic in (b"P1", b"P2", b"P3", b"P4") else "not a PGM/PPM"
        raise DataError(f"{source}: {kind} file (header {magic!r}); only binary PGM (P5) and PPM (P6) are read")
    whitespace = b" \t\r\n\x0b\x0c"
    position = 2
    fields = []
    for field_name in ("width", "height", "maxval"):
        while position < len(data) and (data[position] in whitespace or data[position] == ord("#")):
            if data[position] == ord("#"):
                line_end = data.find(b"\n", position)
                position = len(data) if line_end < 0 else line_end + 1
            else:
                position += 1
        start = position
        while position < len(data) and 48 <= data[position] <= 57:
            position += 1
        if start == position:
            raise DataError(f"{source}: malformed PGM/PPM header, expected the {field_name} as a decimal number")
        fields.append(int(data[start:position]))
    width, height, maxval = fields
    if position >= len(data) or data[position] not in whitespace:
        raise DataError(f"{source}: malformed PGM/PPM header, expected whitespace after maxval")
    position += 1
    if width < 1 or height < 1 or not 1 <= maxval <= 65535:
        raise DataError(f"{source}: PGM/PPM needs width, height >= 1 and maxval in [1, 65535], got {fields}")
    channels = 1 if magic == b"P5" else 3
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    expected = width * height * channels * dtype.itemsize
    raster = data[position : position + expected]
    if len(raster) < expected:
        raise DataError(f"{source}: truncated PGM/PPM, expected {expected} bytes of pixels, found {len(raster)}")
    samples = np.frombuffer(raster, dtype=dtype).reshape(height, width, channels)
    return samples.astype(np.float32) / np.float32(maxval)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _decode_png(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode a PNG with the standard library's zlib to float32 ``[H, W, C]`` in ``[0, 1]``.

    Supported: bit depth 8 or 16; grey (C=1), grey+alpha (C=2), RGB (C=3), RGBA (C=4); no interlacing;
    all five row filters. Chunk CRCs are checked. Palette, low-bit-depth and interlaced images raise.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise DataError(f"{source}: not a PNG file (bad signature)")
    position = len(_PNG_SIGNATURE)
    header: tuple[int, ...] | None = None
    compressed: list[bytes] = []
    ended = False
    while position + 8 <= len(data):
        length, chunk_type = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        crc = data[position + 8 + length : position + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise DataError(f"{source}: truncated PNG ({chunk_type!r} chunk runs past the end of the file)")
        if zlib.crc32(chunk_type + body) != int.from_bytes(crc, "big"):
            raise DataError(f"{source}: corrupt PNG (CRC mismatch in the {chunk_type!r} chunk)")
        position += 12 + length
        if chunk_type == b"IHDR":
            if length != 13:
                raise DataError(f"{source}: corrupt PNG (IHDR chunk of {length} bytes, expected 13)")
            header = struct.unpack(">IIBBBBB", body)
        elif chunk_type == b"IDAT":
            compressed.append(body)
        elif chunk_type == b"IEND":
            ended = True
            break
    if header is None or not compressed or not ended:
        raise DataError(f"{source}: truncated or corrupt PNG (missing IHDR, IDAT or IEND chunk)")
    width, height, bit_depth, colour_type, _compression, _filter_method, interlace = header
    if colour_type == 3:
        raise DataError(f"{source}: palette PNGs are not supported; save it as grey or RGB")
    if colour_type not in _PNG_CHANNELS:
        raise DataError(f"{source}: unknown PNG colour type {colour_type}")
    if bit_depth not in (8, 16):
        raise DataError(f"{source}: PNG bit depth must be 8 or 16, got {bit_depth}")
    if interlace != 0:
        raise DataError(f"{source}: interlaced PNGs are not supported; save it without interlacing")
    if width < 1 or height < 1:
        raise DataError(f"{source}: PNG has an empty size {width}x{height}")
    channels = _PNG_CHANNELS[colour_type]
    pixel_bytes = channels * bit_depth // 8
    stride = width * pixel_bytes
    try:
        raw = zlib.decompress(b"".join(compressed))
    except zlib.error as error:
        raise DataError(f"{source}: corrupt PNG image data ({error})") from error
    if len(raw) < height * (stride + 1):
        raise DataError(f"{source}: truncated PNG image data ({len(raw)} bytes, expected {height * (stride + 1)})")
    rows = np.frombuffer(raw, dtype=np.uint8, count=height * (stride + 1)).reshape(height, stride + 1)
    pixels = np.empty((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    for row_index in range(height):
        filter_type = int(rows[row_index, 0])
        line = rows[row_index, 1:]
        if filter_type == 0:
            current = line
        elif filter_type == 1:
            current = np.cumsum(line.reshape(width, pixel_bytes), axis=0, dtype=np.uint64).astype(np.uint8).ravel()
        elif filter_type == 2:
            current = line + previous
        elif filter_type in (3, 4):
            current = np.frombuffer(_unfilter_sequential(filter_type, line.tobytes(), previous.tobytes(), pixel_bytes),
                                    dtype=np.uint8)
        else:
            raise DataError(f"{source}: corrupt PNG (row {row_index} has unknown filter type {filter_type})")
        pixels[row_index] = current
        previous = pixels[row_index]
    if bit_depth == 16:
        samples = pixels.view(">u2").reshape(height, width, channels).astype(np.float32) / np.float32(65535)
    else:
        samples = pixels.reshape(height, width, channels).astype(np.float32) / np.float32(255)
    return samples


def _unfilter_sequential(filter_type: int, line: bytes, previous: bytes, pixel_bytes: int) -> bytearray:
    """Undo the PNG Average (3) or Paeth (4) filter of one row; both depend on the reconstructed left byte."""
    current = bytearray(line)
    for index in range(len(current)):
        left = current[index - pixel_bytes] if index >= pixel_bytes else 0
        above = previous[index]
        if filter_type == 3:
            current[index] = (current[index] + ((left + above) >> 1)) & 0xFF
            continue
        upper_left = previous[index - pixel_bytes] if index >= pixel_bytes else 0
        estimate = left + above - upper_left
        distance_left, distance_above, distance_upper_left = (
            abs(estimate - left), abs(estimate - above), abs(estimate - upper_left)
        )
        if distance_left <= distance_above and distance_left <= distance_upper_left:
            predictor = left
        elif distance_above <= distance_upper_left:
            predictor = above
        else:
            predictor = upper_left
        current[index] = (current[index] + predictor) & 0xFF
    return current


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
    values = key_vocab_size + _uniform_sample_without_replacement(
        rng, vocab_size - key_vocab_size, num_examples, num_kv_pairs
    )
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


def _uniform_sample_without_replacement(
    rng: np.random.Generator, population: int, rows: int, size: int
) -> np.ndarray:
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


def _weighted_sample_without_replacement(
    rng: np.random.Generator, log_weights: np.ndarray, rows: int, size: int
) -> np.ndarray:
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


def _check_positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{option} must be a positive integer, got {value!r}")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for option, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise DataError(f"{option} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(
            f"val_fraction + test_fraction must be below 1 to leave training data, got "
            f"{val_fraction} + {test_fraction}"
        )


def _stratified_partition(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator, source: str
) -> list[np.ndarray]:
    """Split sample indices into ``[train, held_out_1, ...]``, stratified by ``labels [N]``.

    Held-out part ``k`` gets ``round(fractions[k] * N)`` samples (at least 1 when the fraction is positive),
    shared among classes in proportion to their size by largest remainder, never taking a class's last
    sample away from train. Each part's indices are sorted ascending.
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


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, antialiased when shrinking): ``[N, C, H, W] -> [N, C, R, R]``."""
    height, width = images.shape[-2:]
    if (height, width) == (resolution, resolution):
        return images
    shrinking = height > resolution or width > resolution
    return F.interpolate(
        images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrinking
    )


def _image_task(
    name: str,
    train: tuple[torch.Tensor, np.ndarray],
    val: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    num_classes: int,
) -> TaskData:
    """Normalise float ``[N, C, H, W]`` images in ``[0, 1]`` per channel with train stats and build the task."""
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
        name, *(int(split.targets.shape[0]) for split in splits), tuple(train_images.shape[1:]), num_classes,
        [round(value, 4) for value in mean.tolist()], [round(value, 4) for value in std.tolist()],
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


def _to_unit_range(array: np.ndarray, source: str) -> np.ndarray:
    """Cast image samples to float32: uint8 / 255, uint16 / 65535, bool as 0/1, floating unchanged."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        result = array.astype(np.float32)
        if not np.isfinite(result).all():
            raise DataError(f"{source}: image values must be finite, found NaN or infinity")
        return result
    raise DataError(
        f"{source}: image dtype must be uint8, uint16, bool or floating, got {array.dtype} "
        f"(if the values are 0..255, save them with .astype(numpy.uint8))"
    )


def _convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``[H, W, 1 or 3] -> [H, W, channels]``: grey is repeated, colour becomes ITU-R 601 luma."""
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    luma = image @ np.asarray(_LUMA_WEIGHTS, dtype=np.float32)
    return np.ascontiguousarray(luma[:, :, None])


def _npz_images(array: np.ndarray, source: str) -> torch.Tensor:
    """``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]`` (C in 1, 3) -> float32 ``[N, C, H, W]``."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        channels_first, channels_last = array.shape[1] in (1, 3), array.shape[3] in (1, 3)
        if channels_first and channels_last:
            logger.warning("%s: shape %s is ambiguous, reading it as [N, C, H, W]", source, array.shape)
        elif channels_last:
            array = array.transpose(0, 3, 1, 2)
        elif not channels_first:
            raise DataError(
                f"{source}: cannot find the channel axis in shape {array.shape}; expected [N, H, W], "
                f"[N, C, H, W] or [N, H, W, C] with C in 1, 3"
            )
    else:
        raise DataError(
            f"{source}: images must have 3 or 4 dimensions ([N, H, W], [N, C, H, W] or [N, H, W, C]), "
            f"got shape {array.shape}"
        )
    if 0 in array.shape[1:]:
        raise DataError(f"{source}: images have an empty dimension, shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(_to_unit_range(array, source)))


def _npz_labels(array: np.ndarray, source: str) -> np.ndarray:
    """Integer labels ``[N]``, non-negative, as int64."""
    if array.ndim != 1:
        raise DataError(f"{source}: labels must have shape [N], got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{source}: labels must have an integer dtype, got {array.dtype}")
    if array.size and array.min() < 0:
        raise DataError(f"{source}: labels must be non-negative, found {int(array.min())}")
    return array.astype(np.int64)


def _canonical_dataset_name(name: str) -> str:
    aliases = {known.replace("_", ""): known for known in TORCHVISION_DATASETS}
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else ""
    if key in aliases:
        return aliases[key]
    close = difflib.get_close_matches(str(name).lower(), TORCHVISION_DATASETS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
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
        raise DataError(
            f"{file}: not an unsigned-byte IDX file with {ndim} dimension(s) (magic {data[:4].hex() or 'empty'}, "
            f"expected 000008{ndim:02x})"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = math.prod(shape)
    if len(data) - header_size != expected:
        raise DataError(
            f"{file}: IDX header promises shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header_size} bytes of data"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits only what pickled NumPy arrays need, so a tampered file cannot run code."""

    _ALLOWED = frozenset({
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar(
    folder: Path, file_names: Sequence[str], label_key: str, dataset: str
) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python pickles: images uint8 ``[N, 3, 32, 32]`` and labels ``[N]``."""
    images, labels = [], []
    for file_name in file_names:
        file = folder / file_name
        if not file.is_file():
            raise _missing_file_error(str(file), dataset)
        try:
            with file.open("rb") as stream:
                batch = _ArrayOnlyUnpickler(stream, encoding="latin1").load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
                KeyError) as error:
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
            raise DataError(
                f"{file}: {label_key!r} must hold {data.shape[0]} integers, "
                f"got {batch_labels.dtype} {batch_labels.shape}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)
