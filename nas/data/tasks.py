"""From a space file's ``task`` section to tensors in memory (``nas.data``)."""

from __future__ import annotations

from nas.data import datasets as data
from nas.space.schema import TaskModel
from nas.supernets.space import SearchSpace


def load_task_data(task: TaskModel, space: SearchSpace, seed: int = 0) -> data.TaskData:
    """Load or generate the task's data; raises ``data.DataError`` (before any training) when it cannot."""
    if task.dataset == "mqar":
        loaded = data.make_mqar(
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
            raise data.DataError(f"sequence_length {shortest} leaves no room for queries after {task.num_kv_pairs} key-value pairs")
        return loaded
    resolution = task.input_shape[1]
    if task.dataset == "digits":
        loaded = data.load_digits(resolution=resolution, seed=seed)
    elif task.dataset == "image_folder":
        loaded = data.load_image_folder(task.path, resolution, channels=task.input_shape[0], val_fraction=task.val_fraction, test_fraction=task.test_fraction, seed=seed)
    elif task.dataset == "npz":
        loaded = data.load_npz(task.path, resolution, val_fraction=task.val_fraction, test_fraction=task.test_fraction, seed=seed)
    else:
        loaded = data.load_torchvision_on_disk(task.dataset, task.path or ".", resolution, val_fraction=task.val_fraction, seed=seed)
    if loaded.input_shape[0] != task.input_shape[0]:
        raise data.DataError(f"task.input_shape says {task.input_shape[0]} channel(s), but the data has {loaded.input_shape[0]}")
    if loaded.num_classes != task.num_classes:
        raise data.DataError(f"task.num_classes is {task.num_classes}, but the data has {loaded.num_classes} classes")
    return loaded
