"""Checks shared by the tests of the image token-mixer blocks (pool_mixer, pconv, inception_next, efficient_mod)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import torch

from nas.space.schema import parse_config
from nas.supernets.blocks import BlockChoices, BlockContext, ElasticBlock, block_type
from nas.supernets.blocks.base import type_of
from nas.supernets.costs import count_macs
from nas.supernets.supernet import Supernet
from tests.helpers import randomise_batch_norm


def tiny_space(block_yaml: str) -> str:
    """A two-stage 8x8 digits space: MBConv in the first stage; ``block_yaml`` (one YAML flow mapping) next to
    MBConv in the second."""
    return f"""\
name: tiny_mixer
task: {{dataset: digits, input_shape: [1, 8, 8], num_classes: 10}}
stem: {{channels: 8, kernel_size: 3, stride: 1, activation: relu}}
stages:
  - depth: [1]
    width: [8]
    stride: 2
    blocks:
      - {{type: mbconv, kernel_size: 3, expand_ratio: 2, activation: relu, squeeze_excite: false}}
  - depth: [1, 2]
    width: [12, 16]
    stride: 1
    blocks:
      - {{type: mbconv, kernel_size: 3, expand_ratio: [2, 3], activation: relu, squeeze_excite: false}}
      - {block_yaml}
head: {{channels: [24]}}
resolution: [7, 8]
"""


def check_supernet_equals_extracted(block_yaml: str, name: str, archs: int = 6) -> None:
    """Build the tiny space around ``block_yaml``, and check that the supernet's logits equal the extracted subnet's
    for the largest, the smallest and random archs, including some that use block ``name``."""
    space = parse_config(tiny_space(block_yaml)).space
    torch.manual_seed(0)
    supernet = Supernet(space)
    randomise_batch_norm(supernet)
    supernet.eval()
    rng = np.random.default_rng(0)
    chosen = [space.largest(), space.smallest()]
    for _ in range(200):
        if len(chosen) >= archs:
            break
        arch = space.sample(rng)
        if any(block_type_name(block) == name for stage in arch.stages for block in stage.blocks):
            chosen.append(arch)
    assert any(block_type_name(block) == name for arch in chosen for stage in arch.stages for block in stage.blocks)
    for arch in chosen:
        x = torch.randn(2, 1, arch.resolution, arch.resolution)
        supernet.set_active(arch)
        static = supernet.extract().eval()
        with torch.no_grad():
            torch.testing.assert_close(static(x), supernet(x), atol=1e-5, rtol=0, msg=arch.short_name())


def block_type_name(config: object) -> str:
    return type_of(config).name


def make_elastic(name: str, fields: dict[str, tuple], channels: int, seed: int = 0) -> ElasticBlock:
    """An elastic block ``name`` of width ``channels`` with perturbed weights and random batch-norm statistics."""
    torch.manual_seed(seed)
    block = block_type(name).elastic_class(BlockContext("image", channels, channels), BlockChoices.build(name, fields))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    randomise_batch_norm(block, seed)
    return block.eval()


def check_reorder_keeps_largest(block: ElasticBlock, channels: int) -> None:
    """``reorder_channels`` leaves the largest choice's output unchanged, and does move some weights."""
    block.set_active(block.choices.largest(), channels, channels)
    x = torch.randn(2, channels, 7, 5)
    before_state = {key: value.clone() for key, value in block.state_dict().items()}
    with torch.no_grad():
        before = block(x)
        block.reorder_channels()
        after = block(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert any(not torch.equal(before_state[key], value) for key, value in block.state_dict().items())


def static_macs(block: ElasticBlock, config: object, channels: int, height: int, width: int) -> int:
    """MACs (``count_macs``) of the extracted static block of ``config`` on one ``[channels, height, width]`` image."""
    block.set_active(config, channels, channels)
    return count_macs(block.extract(), torch.zeros(1, channels, height, width))


def onnx_matches(module: torch.nn.Module, x: torch.Tensor) -> float:
    """The largest absolute difference between ``module(x)`` and ONNX Runtime on its export (opset 17)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), buffer, dynamo=False, opset_version=17, input_names=["input"], output_names=["output"])
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = module(x).numpy()
    return float(np.abs(session.run(None, {"input": x.numpy()})[0] - expected).max())
