"""The ``DATASETS`` registry: built-in entries, a dataset registered at test time (and by a plugin file) used through
the schema and ``load_task_data``, and the checks on what a loader returns."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import nas.data.registry
from nas.data import DATASETS, DataError, Dataset, Split, TaskData, image_task, load_task_data, register_dataset
from nas.space.schema import ConfigError, Problem, TaskModel, load_config, parse_config
from nas.supernets.blocks.base import MODALITIES
from nas.supernets.registry import DuplicateNameError, UnknownNameError
from nas.supernets.space import SearchSpace
from tests.helpers import TINY_DIGITS_SPACE

BUILT_IN = {
    "digits": "image",
    "mqar": "sequence",
    "image_folder": "image",
    "npz": "image",
    "mnist": "image",
    "fashion_mnist": "image",
    "cifar10": "image",
    "cifar100": "image",
}


def space_with_task(task: dict) -> str:
    data = yaml.safe_load(TINY_DIGITS_SPACE)
    data["task"] = task
    return yaml.safe_dump(data, sort_keys=False)


def stripes(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
    """Two classes of 1-channel images: blank or horizontally striped (``[N, 1, H, W]``)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(60) % 2
    size = task.input_shape[1]
    images = torch.from_numpy(rng.uniform(0.0, 0.2, size=(60, 1, size, size)).astype(np.float32))
    images[torch.from_numpy(labels == 1), :, ::2] += 0.8
    return image_task("stripes", (images[:40], labels[:40]), (images[40:50], labels[40:50]), (images[50:], labels[50:]), 2)


def problems_of(task: dict) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_config(space_with_task(task))
    return caught.value.problems


@pytest.fixture
def temporary_names() -> Iterator[list[str]]:
    """Names a test registers; unregistered afterwards whatever happens."""
    names: list[str] = []
    yield names
    for name in names:
        DATASETS.unregister(name)


def test_every_built_in_dataset_is_registered_with_its_modality() -> None:
    for name, modality in BUILT_IN.items():
        assert DATASETS.get(name).modality == modality
        assert DATASETS.entry(name).source.startswith("nas.data.")
        assert list(inspect.signature(DATASETS.get(name).load).parameters) == ["task", "space", "seed"]
    for name in DATASETS.names():
        entry = DATASETS.get(name)
        assert isinstance(entry, Dataset) and callable(entry.load)
        assert entry.modality in MODALITIES, name


def test_a_dataset_registered_at_test_time_is_used_like_a_built_in_one(temporary_names: list[str]) -> None:
    temporary_names.append("stripes")
    register_dataset("stripes", modality="image", channels=1, num_classes=2)(stripes)
    assert "stripes" in DATASETS.names() and DATASETS.get("stripes").description.startswith("Two classes")
    config = parse_config(space_with_task({"dataset": "stripes", "input_shape": [1, 8, 8], "num_classes": 2}))
    assert config.task.modality == "image" and config.space.modality == "image"
    loaded = load_task_data(config.task, config.space, seed=3)
    assert loaded.name == "stripes" and loaded.input_shape == (1, 8, 8) and loaded.train.inputs.shape == (40, 1, 8, 8)
    with pytest.raises(ConfigError) as caught:
        parse_config(space_with_task({"dataset": "stripes", "input_shape": [3, 8, 8], "num_classes": 5}))
    messages = {problem.path: problem.message for problem in caught.value.problems}
    assert messages["task.input_shape[0]"] == "stripes has 1 channel(s), got 3"
    assert messages["task.num_classes"] == "stripes has 2 classes, got 5"

    DATASETS.unregister("stripes")
    assert "stripes" not in DATASETS
    with pytest.raises(ConfigError, match=r"task\.dataset: must be one of \[.*\], got 'stripes'"):
        parse_config(space_with_task({"dataset": "stripes", "input_shape": [1, 8, 8], "num_classes": 2}))
    with pytest.raises(DataError, match="task.dataset must be one of"):
        load_task_data(config.task, config.space)


def test_duplicate_registration_is_refused(temporary_names: list[str]) -> None:
    with pytest.raises(DuplicateNameError, match=r"dataset 'digits' is already registered \(by nas.data.builtin\)"):
        register_dataset("digits", modality="image")(stripes)
    assert DATASETS.entry("digits").source == "nas.data.builtin"
    temporary_names.append("stripes")
    register_dataset("stripes", modality="image")(stripes)
    with pytest.raises(DuplicateNameError, match="'stripes' is already registered"):
        register_dataset("stripes", modality="image")(stripes)


def test_bad_entries_are_refused() -> None:
    with pytest.raises(ValueError, match=r"Dataset.modality must be one of \['image', 'sequence'\], got 'audio'"):
        register_dataset("sounds", modality="audio")(stripes)
    with pytest.raises(ValueError, match=r"requires must name task options \[.*'path'.*\], got \['folder'\]"):
        register_dataset("sounds", modality="image", requires=("folder",))
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_dataset("My-Data", modality="image")(stripes)
    assert "sounds" not in DATASETS


def test_unknown_names_get_a_did_you_mean() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        DATASETS.get("digitz")
    with pytest.raises(ConfigError) as caught:
        parse_config(space_with_task({"dataset": "cifar1O", "input_shape": [3, 8, 8], "num_classes": 10}))
    message = next(problem.message for problem in caught.value.problems if problem.path == "task.dataset")
    assert message == f"must be one of {list(DATASETS.names())}, got 'cifar1O'; did you mean 'cifar10'?"


def test_required_options_come_from_the_entry(temporary_names: list[str]) -> None:
    found = {problem.path: problem.message for problem in problems_of({"dataset": "npz", "input_shape": [1, 8, 8], "num_classes": 2})}
    assert found["task.path"] == "is required for the npz dataset"
    temporary_names.append("stripes")
    register_dataset("stripes", modality="image", requires=("path",))(stripes)
    found = {problem.path: problem.message for problem in problems_of({"dataset": "stripes", "input_shape": [1, 8, 8], "num_classes": 2})}
    assert found["task.path"] == "is required for the stripes dataset"


def test_what_a_loader_returns_is_checked(temporary_names: list[str]) -> None:
    config = parse_config(TINY_DIGITS_SPACE)

    def not_task_data(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
        return {"train": None}  # type: ignore[return-value]

    def sequence_data(task: TaskModel, space: SearchSpace, seed: int) -> TaskData:
        split = Split(torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.int64))
        return TaskData("tokens", "sequence", split, split, split, num_classes=10, input_shape=(8,), vocab_size=10)

    for name, loader, message in (
        ("returns_dict", not_task_data, r"dataset 'returns_dict' \(registered by .*test_data_registry\) must return a TaskData, got dict"),
        ("returns_tokens", sequence_data, "is registered as 'image' but returned 'sequence' data"),
        ("returns_stripes", stripes, "task.num_classes is 10, but the data has 2 classes"),
    ):
        temporary_names.append(name)
        register_dataset(name, modality="image")(loader)
        task = config.task.model_copy(update={"dataset": name})
        with pytest.raises(DataError, match=message):
            load_task_data(task, config.space)


def test_the_plugin_example_of_the_registry_docstring_works(tmp_path: Path, temporary_names: list[str]) -> None:
    """The example in ``nas.data.registry``'s docstring, written to a plugin file named in a space file."""
    docstring = nas.data.registry.__doc__ or ""
    example = docstring.split("::\n\n", 1)[1].split("\n\nafter which", 1)[0]
    code = "\n".join(line[4:] for line in example.splitlines())
    assert '@register_dataset("stripes"' in code
    (tmp_path / "my_data.py").write_text(code)
    temporary_names.append("stripes")
    data = yaml.safe_load(TINY_DIGITS_SPACE)
    data["plugins"] = ["my_data.py"]
    data["task"] = {"dataset": "stripes", "input_shape": [1, 16, 16], "num_classes": 2}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    config = load_config(tmp_path / "space.yaml")
    loaded = load_task_data(config.task, config.space, seed=0)
    assert loaded.input_shape == (1, 16, 16) and loaded.num_classes == 2
    assert loaded.train.inputs.shape[0] + loaded.val.inputs.shape[0] + loaded.test.inputs.shape[0] == 200
    assert "my_data" in DATASETS.entry("stripes").source
