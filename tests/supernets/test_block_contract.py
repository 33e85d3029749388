"""One contract over every registered block: elastic == extracted == ONNX Runtime, parameter counts agree."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nas.supernets.blocks import BLOCKS, BlockChoices, BlockContext, BoolRule, FloatRule, IntRule, OptionRule
from nas.supernets.elastic import count_parameters
from tests.helpers import randomise_batch_norm


def two_choices(rule) -> tuple:
    """Two small valid values of any numeric field rule; every value of a name or boolean field."""
    if isinstance(rule, IntRule):
        step = 2 if rule.odd else 1
        start = rule.minimum if not rule.odd or rule.minimum % 2 else rule.minimum + 1
        start = max(start, 3) if rule.odd else start
        return (start, start + step)
    if isinstance(rule, FloatRule):
        return (float(rule.minimum), min(float(rule.minimum) + 1.0, float(rule.maximum)))
    if isinstance(rule, OptionRule):
        return rule.values
    assert isinstance(rule, BoolRule)
    return (False, True)


def cases():
    for name, entry in BLOCKS.items():
        for modality in sorted(entry.modalities):
            yield pytest.param(name, modality, id=f"{name}-{modality}")


def example(modality: str, channels: int) -> torch.Tensor:
    return torch.randn(2, channels, 7, 5) if modality == "image" else torch.randn(2, 9, channels)


def onnx_output(module: torch.nn.Module, x: torch.Tensor, batch: torch.Tensor) -> np.ndarray:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch.numpy()})[0]


def contract_configs(choices: BlockChoices, rules: dict) -> list:
    """The smallest and the largest config, random ones, and, for every value of every name or boolean field, a random
    config holding it (so an option such as ``ffn: hourglass`` is always exercised)."""
    rng = np.random.default_rng(0)
    configs = [choices.smallest(), choices.largest(), choices.sample(rng), choices.sample(rng)]
    for field, values in choices.fields:
        if isinstance(rules[field], OptionRule | BoolRule):
            configs.extend(dataclasses.replace(choices.sample(rng), **{field: value}) for value in values)
    return list(dict.fromkeys(configs))


@pytest.mark.parametrize(("name", "modality"), list(cases()))
def test_every_block_elastic_equals_extracted_equals_onnx(name: str, modality: str) -> None:
    entry = BLOCKS.get(name)
    choices = BlockChoices.build(name, {field: two_choices(rule) for field, rule in entry.rules.items()})
    stride = 2 if entry.reshapes and modality == "image" else 1
    in_max, out_max = (12, 16) if entry.reshapes else (16, 16)
    elastic = entry.elastic_class(BlockContext(modality, in_max, out_max, stride, causal=modality == "sequence"), choices)
    with torch.no_grad():
        for parameter in elastic.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    randomise_batch_norm(elastic)
    elastic.eval()
    for trial, config in enumerate(contract_configs(choices, entry.rules)):
        in_channels, out_channels = ((8, 12) if entry.reshapes else (12, 12)) if trial % 2 else (in_max, out_max)
        elastic.set_active(config, in_channels, out_channels)
        x = example(modality, in_channels)
        static = elastic.extract().eval()
        with torch.no_grad():
            expected = elastic(x)
            extracted = static(x)
        assert (expected - extracted).abs().max().item() <= 1e-5, config
        fresh = entry.static_class(config, dataclasses.replace(elastic.context, in_channels=in_channels, out_channels=out_channels))
        assert count_parameters(static) == count_parameters(fresh)
        assert static.state_dict().keys() == fresh.state_dict().keys()
        supernet_storage = {parameter.data_ptr() for parameter in elastic.parameters()}
        assert not any(tensor.data_ptr() in supernet_storage for tensor in static.state_dict().values())
        batch = example(modality, in_channels)[:1].repeat(3, *([1] * (x.ndim - 1))) + 0.1
        with torch.no_grad():
            reference = static(batch).numpy()
        assert np.abs(onnx_output(static, x, batch) - reference).max() <= 1e-4


@pytest.mark.parametrize(("name", "modality"), list(cases()))
def test_every_block_rejects_values_outside_its_choices(name: str, modality: str) -> None:
    entry = BLOCKS.get(name)
    choices = BlockChoices.build(name, {field: two_choices(rule) for field, rule in entry.rules.items()})
    elastic = entry.elastic_class(BlockContext(modality, 16, 16, 1, causal=modality == "sequence"), choices)
    field, values = choices.fields[0]
    rule = entry.rules[field]
    outside = values[-1] + (2 if isinstance(rule, IntRule) else 1) if not isinstance(rule, OptionRule | BoolRule) else "not-a-choice"
    config = dataclasses.replace(choices.largest(), **{field: outside})
    before = elastic.config
    with pytest.raises(ValueError, match=field):
        elastic.set_active(config, 16, 16)
    assert elastic.config == before
