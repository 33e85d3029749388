"""From a space file's ``task`` section to tensors in memory: the dataset named in ``task.dataset`` is looked up in
``DATASETS`` and what its loader returns is checked against its entry and the task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas.data.registry import DATASETS
from nas.data.splits import DataError, TaskData

if TYPE_CHECKING:
    from nas.space.schema import TaskModel
    from nas.supernets.space import SearchSpace


def load_task_data(task: TaskModel, space: SearchSpace, seed: int = 0) -> TaskData:
    """Load or generate the task's data; raises ``DataError`` (before any training) when it cannot.

    Returns:
        the dataset's :class:`TaskData`: image inputs ``[N, C, H, W]`` or sequence inputs ``[N, L]``.

    Raises:
        DataError: an unknown dataset, a ``task`` option the dataset requires that is not set, a loader that
            returns something else than a ``TaskData`` of its modality, or data whose channels or classes
            disagree with ``task.input_shape`` and ``task.num_classes``.
    """
    problem = DATASETS.problem(task.dataset)
    if problem is not None:
        raise DataError(f"task.dataset {problem}")
    entry = DATASETS.entry(task.dataset)
    dataset = entry.value
    for option in dataset.requires:
        if getattr(task, option, None) is None:
            raise DataError(f"task.{option} is required for the {task.dataset} dataset")
    loaded = dataset.load(task, space, seed)
    if not isinstance(loaded, TaskData):
        raise DataError(f"dataset {task.dataset!r} (registered by {entry.source}) must return a TaskData, got {type(loaded).__name__}")
    if loaded.modality != dataset.modality:
        raise DataError(f"dataset {task.dataset!r} (registered by {entry.source}) is registered as {dataset.modality!r} but returned {loaded.modality!r} data")
    if dataset.modality == "image" and loaded.input_shape[0] != task.input_shape[0]:
        raise DataError(f"task.input_shape says {task.input_shape[0]} channel(s), but the data has {loaded.input_shape[0]}")
    if loaded.num_classes != task.num_classes:
        raise DataError(f"task.num_classes is {task.num_classes}, but the data has {loaded.num_classes} classes")
    return loaded
