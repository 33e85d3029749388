"""The user's own image data: a folder of image files with one subfolder per class, or NumPy ``.npz`` arrays.

Image files are decoded with Pillow (``.png``, ``.pgm``, ``.ppm``, ``.pnm``) or NumPy (``.npy``) by
:func:`read_image_file`. Both sources register in ``DATASETS`` below: ``image_folder`` and ``npz``, each reading
``task.path``.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nas.data.registry import register_dataset
from nas.data.splits import (
    DataError,
    TaskData,
    check_fractions,
    check_positive_int,
    image_task,
    resize_images,
    stratified_partition,
)

if TYPE_CHECKING:
    from nas.space.schema import TaskModel
    from nas.supernets.space import SearchSpace

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".npy", ".pgm", ".ppm", ".pnm", ".png")
"""File name endings that :func:`load_image_folder` reads (compared case-insensitively)."""

_PILLOW_FORMATS = {suffix: ("PPM", "PBM/PGM/PPM") for suffix in (".pgm", ".ppm", ".pnm")} | {".png": ("PNG", "PNG")}
"""File ending -> (the Pillow format allowed to open it, the name used in messages)."""
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def load_image_folder(
    path: str | Path,
    resolution: int,
    channels: int = 3,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """Images in one subfolder per class (``path/<class>/**/<image>``), read with :func:`read_image_file`.

    Classes are the non-hidden subfolders of ``path``, sorted by name; class ``i`` is the ``i``-th. Files
    are found recursively inside each class folder; hidden files are ignored and files with other endings
    are skipped with a warning. Readable formats:

    - ``.npy``: one array ``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4; an alpha channel is dropped), dtype
      uint8, uint16, bool or floating (floating values are used as they are);
    - ``.pgm`` / ``.ppm`` / ``.pnm``: PBM, PGM or PPM, binary or plain text, maxval up to 65535;
    - ``.png``: any PNG (grey, grey+alpha, RGB, RGBA, palette; interlaced or not; 1 to 16 bits).

    Grey images are repeated to 3 channels when ``channels == 3``; colour images become grey with the
    ITU-R 601 luma weights when ``channels == 1``. Each image is resized to ``resolution x resolution``,
    the split is stratified by class and drawn from ``seed``, and the normalisation uses the train split.

    Returns:
        image :class:`TaskData` named after the folder; inputs ``[N, channels, resolution, resolution]``.
    """
    root = Path(path)
    check_positive_int("resolution", resolution)
    if channels not in (1, 3):
        raise DataError(f"channels must be one of [1, 3], got {channels!r}")
    check_fractions(val_fraction, test_fraction)
    if not root.exists():
        raise DataError(f"{root}: image folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder with one subfolder per class, got a file")
    class_dirs = sorted((entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")), key=lambda entry: entry.name)
    if not class_dirs:
        raise DataError(f"{root}: no class subfolders; expected one subfolder per class, e.g. {root / 'cat' / '0001.png'}")
    if len(class_dirs) < 2:
        raise DataError(
            f"{root}: found a single class subfolder {class_dirs[0].name!r}; a classification task needs at "
            f"least 2 (point path at the folder that holds one subfolder per class)"
        )

    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            entry for entry in class_dir.rglob("*") if entry.is_file() and not any(part.startswith(".") for part in entry.relative_to(class_dir).parts)
        )
        readable = [entry for entry in files if entry.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [entry for entry in files if entry.suffix.lower() not in IMAGE_SUFFIXES]
        if not readable:
            found = f"; found only {len(skipped)} other file(s) such as {skipped[0].name!r}" if skipped else ""
            raise DataError(f"{class_dir}: class folder has no readable images (readable endings: {', '.join(IMAGE_SUFFIXES)}){found}")
        if skipped:
            logger.warning(
                "%s: skipped %d file(s) that are not %s, e.g. %s",
                class_dir,
                len(skipped),
                "/".join(IMAGE_SUFFIXES),
                skipped[0].name,
            )
        for file in readable:
            image = _convert_channels(read_image_file(file), channels)
            images.append(resize_images(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0), resolution)[0])
            labels.append(label)

    label_array = np.asarray(labels, dtype=np.int64)
    stacked = torch.stack(images)
    train, val, test = (
        (stacked[index], label_array[index])
        for index in stratified_partition(label_array, (val_fraction, test_fraction), np.random.default_rng(seed), str(root))
    )
    logger.info("%s: classes %s", root, ", ".join(f"{index}={entry.name}" for index, entry in enumerate(class_dirs)))
    return image_task(root.resolve().name, train, val, test, num_classes=len(class_dirs))


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
        check_positive_int("resolution", resolution)
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
            raise DataError(f"{file}: x_{name} has {images.shape[0]} images but y_{name} has {labels.shape[0]} labels")
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
        check_fractions(*(fractions[name] if name in held_out else 0.0 for name in ("val", "test")))
        train_index, *held_out_index = stratified_partition(train_labels, [fractions[name] for name in held_out], np.random.default_rng(seed), str(file))
        for name, index in zip(held_out, held_out_index, strict=True):
            pairs[name] = (train_images[index], train_labels[index])
        pairs["train"] = (train_images[train_index], train_labels[train_index])

    if resolution is not None:
        pairs = {name: (resize_images(images, resolution), labels) for name, (images, labels) in pairs.items()}
    num_classes = int(max(labels.max(initial=-1) for _, labels in pairs.values())) + 1
    return image_task(file.stem, pairs["train"], pairs["val"], pairs["test"], num_classes=num_classes)


def read_image_file(path: str | Path) -> np.ndarray:
    """Read one image file as float32 ``[H, W, C]`` with C in 1, 3, integer samples scaled to ``[0, 1]``.

    - ``.npy`` (NumPy): ``[H, W]`` or ``[H, W, C]`` with C in 1, 3, 4; uint8 / 255, uint16 / 65535, bool as 0/1,
      floating values as they are.
    - ``.png``, ``.pgm``, ``.ppm``, ``.pnm`` (Pillow): the file must hold the format its ending names. Grey (and
      8-bit grey+alpha) stays one channel; everything else, palette images included, becomes RGB. 8-bit samples
      / 255, 16-bit grey / 65535 (Pillow first scales a PGM/PPM maxval to 255 or 65535). Pillow has no 16-bit
      colour mode, so 16-bit colour (and 16-bit grey+alpha) PNG/PPM files are read at 8 bits per channel, grey+
      alpha as RGB. Chunk checksums of a PNG are verified.

    An alpha channel is dropped.

    Raises:
        DataError: naming the file when it cannot be read, is corrupt or is not a supported image.
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
            raise DataError(f"{file}: a .npy image must have shape [H, W] or [H, W, C] with C in 1, 3, 4, got {array.shape}")
        image = _to_unit_range(array, str(file))
    else:
        image = _decode_with_pillow(file, suffix)
    if image.shape[2] in (2, 4):
        image = image[:, :, : image.shape[2] - 1]
    return np.ascontiguousarray(image, dtype=np.float32)


def _decode_with_pillow(file: Path, suffix: str) -> np.ndarray:
    """Decode a PNG or PBM/PGM/PPM file with Pillow: float32 ``[H, W, C]`` in ``[0, 1]``, C in 1, 3, 4."""
    pillow_format, kind = _PILLOW_FORMATS[suffix]
    try:
        data = file.read_bytes()
    except OSError as error:
        raise DataError(f"{file}: cannot read file ({error})") from error
    try:
        with Image.open(io.BytesIO(data), formats=[pillow_format]) as image:
            image.verify()
        with Image.open(io.BytesIO(data), formats=[pillow_format]) as image:
            image.load()
            array = _pillow_array(image, str(file))
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{file}: not a readable {kind} file (its {suffix} ending promises {kind}; the content is another format or corrupt)") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{file}: image is too large to decode safely ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise DataError(f"{file}: cannot read as a {kind} image, the file is truncated or corrupt ({error})") from error
    if array.ndim == 2:
        array = array[:, :, None]
    if 0 in array.shape:
        raise DataError(f"{file}: image has an empty size {array.shape[1]}x{array.shape[0]}")
    return _to_unit_range(array, str(file))


def _pillow_array(image: Image.Image, source: str) -> np.ndarray:
    """The samples of a decoded Pillow image: ``[H, W]`` (grey) or ``[H, W, 3 or 4]``; uint8, uint16, bool or float32
    (Pillow's ``F`` mode, such as a PFM file, taken as it is)."""
    mode = image.mode
    if mode in ("1", "L", "RGB", "F"):
        return np.asarray(image)
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)
    if mode == "I":
        samples = np.asarray(image)
        if samples.size and (samples.min() < 0 or samples.max() > 65535):
            raise DataError(
                f"{source}: 32-bit integer samples must lie in [0, 65535] to be read as 16-bit grey, found {int(samples.min())}..{int(samples.max())}"
            )
        return samples.astype(np.uint16)
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0))
    return np.asarray(image.convert("RGBA"))


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
        f"{source}: image dtype must be uint8, uint16, bool or floating, got {array.dtype} (if the values are 0..255, save them with .astype(numpy.uint8))"
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
            raise DataError(f"{source}: cannot find the channel axis in shape {array.shape}; expected [N, H, W], [N, C, H, W] or [N, H, W, C] with C in 1, 3")
    else:
        raise DataError(f"{source}: images must have 3 or 4 dimensions ([N, H, W], [N, C, H, W] or [N, H, W, C]), got shape {array.shape}")
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


@register_dataset("image_folder", modality="image", requires=("path",))
def image_folder_for_task(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
    """Image files in task.path, one subfolder per class (PNG, PGM/PPM or .npy)."""
    if task.path is None:
        raise DataError("task.path is required for the image_folder dataset")
    return load_image_folder(
        task.path,
        task.input_shape[1],
        channels=task.input_shape[0],
        val_fraction=task.val_fraction,
        test_fraction=task.test_fraction,
        seed=seed,
    )


@register_dataset("npz", modality="image", requires=("path",))
def npz_for_task(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
    """Image arrays in the NumPy .npz archive task.path (x_train, y_train, optional val and test)."""
    if task.path is None:
        raise DataError("task.path is required for the npz dataset")
    return load_npz(task.path, task.input_shape[1], val_fraction=task.val_fraction, test_fraction=task.test_fraction, seed=seed)
