"""``DATASETS``: every dataset a space file can name in ``task.dataset``, built-in or a user's own.

An entry is a :class:`Dataset`: the loader ``(task, space, seed) -> TaskData`` plus what ``nas validate`` checks
before anything is loaded (the modality, the ``task`` options the loader needs, the channels and classes when
they are fixed). Each built-in dataset registers in its own module (:mod:`nas.data.builtin`,
:mod:`nas.data.files`, :mod:`nas.data.on_disk`); every module of ``nas.data`` is imported on the first look-up,
so a new dataset is one file. A user's dataset registers the same way, from a plugin file named in the space
file (``plugins: [my_data.py]``)::

    # my_data.py
    import numpy as np
    import torch

    from nas.data import image_task, register_dataset, stratified_partition


    @register_dataset("stripes", modality="image", channels=1, num_classes=2)
    def load_stripes(task, space, seed):
        # task: the space file's task section (task.input_shape, task.path, task.val_fraction, ...)
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 2, size=200)
        size = task.input_shape[1]
        images = torch.zeros(200, 1, size, size)  # [N, C, H, W], values in [0, 1]
        images[labels == 1, :, ::2] = 1.0
        parts = stratified_partition(labels, (task.val_fraction, task.test_fraction), rng, "stripes")
        train, val, test = ((images[index], labels[index]) for index in parts)
        return image_task("stripes", train, val, test, num_classes=2)

after which ``task: {dataset: stripes, input_shape: [1, 16, 16], num_classes: 2}`` validates, trains and exports
like a built-in dataset. ``load_task_data`` checks what a loader returns against its entry and the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from nas.supernets.blocks.base import MODALITIES
from nas.supernets.registry import Registry

if TYPE_CHECKING:
    from nas.data.splits import TaskData
    from nas.space.schema import TaskModel
    from nas.supernets.space import SearchSpace

logger = logging.getLogger(__name__)

DatasetLoader: TypeAlias = "Callable[[TaskModel, SearchSpace, int], TaskData]"
"""``(task, space, seed) -> TaskData``: ``task`` is the space file's validated ``task`` section, ``space`` the search
space (its resolutions or sequence lengths), ``seed`` the run's seed; the same arguments give the same data."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """One registered dataset.

    Attributes:
        load: the loader, ``(task, space, seed) -> TaskData``.
        modality: ``"image"`` (inputs ``[N, C, H, W]``) or ``"sequence"`` (inputs ``[N, L]`` token ids).
        requires: ``task`` options that must be set for this dataset (``("path",)``), checked by ``nas validate``.
        channels: the number of input channels when the dataset fixes it (``task.input_shape[0]`` must match).
        num_classes: the number of classes when the dataset fixes it (``task.num_classes`` must match).
        description: one line for listings.
    """

    load: DatasetLoader
    modality: str
    requires: tuple[str, ...] = ()
    channels: int | None = None
    num_classes: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not callable(self.load):
            raise TypeError(f"Dataset.load must be a function (task, space, seed) -> TaskData, got {self.load!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"Dataset.modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if not isinstance(self.requires, tuple) or not all(isinstance(option, str) for option in self.requires):
            raise TypeError(f"Dataset.requires must be a tuple of task option names, got {self.requires!r}")
        for option in ("channels", "num_classes"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Dataset.{option} must be a positive integer or None, got {value!r}")


DATASETS: Registry[Dataset] = Registry("dataset", discover="nas.data")
"""Every dataset by the name used in ``task.dataset``."""


def register_dataset(
    name: str,
    *,
    modality: str,
    requires: Iterable[str] = (),
    channels: int | None = None,
    num_classes: int | None = None,
    description: str | None = None,
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: register the decorated loader ``(task, space, seed) -> TaskData`` in ``DATASETS`` as ``name``.

    ``description`` defaults to the first line of the loader's docstring. The built-in datasets are registered
    first, so a name that is taken raises ``DuplicateNameError`` naming the module that registered it; an option
    in ``requires`` that is not a ``task`` option raises ``ValueError`` listing the options.
    """
    from nas.space.schema import TaskModel

    required = tuple(requires)
    unknown = [option for option in required if option not in TaskModel.model_fields]
    if unknown:
        raise ValueError(f"dataset {name!r}: requires must name task options {sorted(TaskModel.model_fields)}, got {unknown}")

    def decorate(load: DatasetLoader) -> DatasetLoader:
        summary = description
        if summary is None:
            doc = (getattr(load, "__doc__", None) or "").strip()
            summary = doc.splitlines()[0] if doc else ""
        entry = Dataset(load, modality, required, channels, num_classes, summary)
        DATASETS.names()
        DATASETS.register(name, entry, source=getattr(load, "__module__", None) or "<unknown>")
        logger.debug("registered dataset %r (%s) from %s", name, modality, getattr(load, "__module__", "<unknown>"))
        return load

    return decorate
