"""The ELAN / OSA block: RepVGG fusion, elastic depth and width of the aggregation, costs and use in a supernet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nas.space.schema import parse_config
from nas.supernets.blocks import BlockChoices, BlockContext, block_type
from nas.supernets.blocks.elan import ELAN, ELANConfig, ElasticELAN, reparameterise
from nas.supernets.costs import count_macs
from nas.supernets.supernet import Supernet
from tests.helpers import randomise_batch_norm

FIELDS = {"num_convs": (1, 2, 3), "conv_width": (4, 6, 8), "reparam": (False, True)}

SPACE_TEMPLATE = """\
name: tiny
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, kernel_size: 3, stride: 1, activation: relu}
stages:
  - depth: [1, 2]
    width: [8, 12]
    stride: 2
    blocks:
      - {blocks}
      - {type: mbconv, kernel_size: 3, expand_ratio: 2, activation: relu, squeeze_excite: false}
head: {channels: [16]}
resolution: [6, 8]
"""


def make_block(channels: int = 16, fields: dict | None = None) -> ElasticELAN:
    torch.manual_seed(0)
    block = ElasticELAN(BlockContext("image", channels, channels), BlockChoices.build("elan", fields or FIELDS))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    randomise_batch_norm(block)
    return block.eval()


def test_reparameterised_convolution_equals_its_three_branches() -> None:
    torch.manual_seed(1)
    width = 5
    conv3 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
    conv1 = torch.nn.Conv2d(width, width, 1, bias=False)
    norms = [torch.nn.BatchNorm2d(width) for _ in range(3)]
    for seed, norm in enumerate(norms):
        randomise_batch_norm(norm, seed)
        norm.eval()
    fused = reparameterise(conv3, norms[0], conv1, norms[1], norms[2])
    x = torch.randn(3, width, 7, 5)
    with torch.no_grad():
        branches = norms[0](conv3(x)) + norms[1](conv1(x)) + norms[2](x)
        torch.testing.assert_close(fused(x), branches, atol=1e-5, rtol=0)
    assert fused.kernel_size == (3, 3) and fused.bias is not None


@pytest.mark.parametrize(("num_convs", "conv_width", "channels"), [(3, 8, 16), (2, 6, 12), (1, 4, 12)])
def test_extracted_fused_form_equals_multi_branch_elastic_block(num_convs: int, conv_width: int, channels: int) -> None:
    block = make_block()
    config = ELANConfig(num_convs=num_convs, conv_width=conv_width, reparam=True)
    block.set_active(config, channels, channels)
    static = block.extract().eval()
    assert all(isinstance(layer[0], torch.nn.Conv2d) and layer[0].bias is not None and len(layer) == 2 for layer in static.convs)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for layer in static.convs for module in layer.modules())
    x = torch.randn(2, channels, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0)


def test_every_choice_slices_the_fuse_pieces_it_concatenates() -> None:
    block = make_block()
    x = torch.randn(1, 12, 7, 5)
    outputs = {}
    for config in block.choices.configs():
        block.set_active(config, 12, 12)
        static = block.extract().eval()
        assert static.fuse[0].in_channels == (config.num_convs + 1) * config.conv_width
        with torch.no_grad():
            outputs[config] = block(x)
            torch.testing.assert_close(static(x), outputs[config], atol=1e-5, rtol=0)
    assert len({tuple(output.flatten()[:8].tolist()) for output in outputs.values()}) == len(outputs)


def test_reorder_channels_keeps_the_largest_choice() -> None:
    block = make_block()
    x = torch.randn(2, 16, 7, 5)
    for reparam in (False, True):
        block.set_active(ELANConfig(3, 8, reparam), 16, 16)
        with torch.no_grad():
            before = block(x)
            block.reorder_channels()
            torch.testing.assert_close(block(x), before, atol=1e-5, rtol=0)
    scores = sum(piece.weight.abs().sum(dim=(0, 2, 3)) for piece in block.fuse_pieces)
    assert torch.all(scores[:-1] >= scores[1:])


def test_mac_count_equals_hand_count() -> None:
    channels, width, num_convs, pixels = 16, 8, 2, 7 * 5
    static = ELAN(ELANConfig(num_convs=num_convs, conv_width=width, reparam=True), BlockContext("image", channels, channels))
    entry = channels * width * pixels
    convs = num_convs * width * width * 9 * pixels
    fuse = (num_convs + 1) * width * channels * pixels
    assert count_macs(static, torch.zeros(1, channels, 7, 5)) == entry + convs + fuse


def test_registration_refuses_a_width_changing_context() -> None:
    entry = block_type("elan")
    assert not entry.reshapes and entry.modalities == frozenset({"image"})
    with pytest.raises(ValueError, match="elan keeps width"):
        ELAN(ELANConfig(1, 4, False), BlockContext("image", 8, 12))
    with pytest.raises(ValueError, match="elan.num_convs must be between 1 and 8, got 0"):
        ELAN(ELANConfig(0, 4, False), BlockContext("image", 8, 8))
    with pytest.raises(ValueError, match="image"):
        ElasticELAN(BlockContext("sequence", 8, 8), BlockChoices.build("elan", FIELDS))


def tiny_space(blocks: str) -> str:
    """A one-stage image space on 8x8 digits whose stage lists ``blocks`` (YAML flow mappings, one a line)."""
    return SPACE_TEMPLATE.replace("{blocks}", blocks)


def assert_supernet_equals_extracted(space_text: str, block_name: str, samples: int = 6) -> list:
    """Build the supernet of ``space_text``, and check its output equals the extracted static net (eval mode, random
    batch norm statistics) for the largest and smallest arch using ``block_name`` and ``samples`` random archs;
    returns the archs checked."""
    space = parse_config(space_text).space
    torch.manual_seed(0)
    supernet = Supernet(space)
    randomise_batch_norm(supernet)
    supernet.eval()
    rng = np.random.default_rng(0)
    archs = sorted({space.largest(block_name), space.smallest(block_name)} | {space.sample(rng) for _ in range(samples)}, key=lambda a: a.to_json())
    generator = torch.Generator().manual_seed(0)
    for arch in archs:
        x = torch.randn(2, 1, arch.resolution, arch.resolution, generator=generator)
        supernet.set_active(arch)
        static = supernet.extract().eval()
        with torch.no_grad():
            torch.testing.assert_close(static(x), supernet(x), atol=1e-5, rtol=0)
    return archs


def test_supernet_of_a_tiny_space_equals_its_extracted_subnets() -> None:
    blocks = "{type: elan, num_convs: [1, 2], conv_width: [4, 6], reparam: [false, true]}"
    archs = assert_supernet_equals_extracted(tiny_space(blocks), "elan")
    reparams = {config.reparam for arch in archs for stage in arch.stages for config in stage.blocks if isinstance(config, ELANConfig)}
    assert reparams == {False, True}
