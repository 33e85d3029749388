"""Datasets, all held in memory as tensors, and the ``DATASETS`` registry that ``task.dataset`` names.

- :mod:`nas.data.splits`: ``TaskData`` / ``Split`` (what every loader returns, with shapes), ``DataError``,
  batching, stratified partitions, resizing and per-channel normalisation;
- :mod:`nas.data.registry`: ``DATASETS``, the ``Dataset`` entry and ``register_dataset`` (how a plugin adds one);
- :mod:`nas.data.builtin`: scikit-learn's bundled digits and the synthetic MQAR task (no files needed);
- :mod:`nas.data.files`: the user's own image folders (Pillow / NumPy decoding) and ``.npz`` arrays;
- :mod:`nas.data.on_disk`: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 files already on disk;
- :mod:`nas.data.tasks`: ``load_task_data``, a space file's ``task`` section to a checked ``TaskData``.

None of them ever touches the network.
"""

from nas.data.registry import DATASETS, Dataset, DatasetLoader, register_dataset
from nas.data.splits import (
    IGNORE_INDEX,
    DataError,
    Split,
    TaskData,
    image_task,
    iterate_batches,
    resize_images,
    stratified_partition,
)
from nas.data.tasks import load_task_data

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "DataError",
    "Dataset",
    "DatasetLoader",
    "Split",
    "TaskData",
    "image_task",
    "iterate_batches",
    "load_task_data",
    "register_dataset",
    "resize_images",
    "stratified_partition",
]
