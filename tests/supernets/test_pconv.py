"""FasterNet's block (``pconv``): the partial convolution, reordering, MACs, a supernet."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nas.supernets.blocks import BlockContext, block_type
from nas.supernets.blocks.pconv import ElasticPartialConvBlock, PartialConvBlock, PConvConfig, partial_channels
from tests.supernets.image_block_checks import (
    check_reorder_keeps_largest,
    check_supernet_equals_extracted,
    make_elastic,
    static_macs,
)

FIELDS = {"partial_ratio": (0, 0.25, 0.5), "kernel_size": (3, 5), "mlp_ratio": (1, 2), "activation": ("gelu", "relu")}


def config(**changes: object) -> PConvConfig:
    return dataclasses.replace(PConvConfig(partial_ratio=0.25, kernel_size=3, mlp_ratio=2, activation="gelu"), **changes)


def test_registration() -> None:
    entry = block_type("pconv")
    assert entry.elastic_class is ElasticPartialConvBlock and entry.static_class is PartialConvBlock
    assert entry.modalities == frozenset({"image"}) and entry.reshapes is False
    assert entry.shrinks == {"partial_ratio": "width", "kernel_size": "kernel", "mlp_ratio": "width", "activation": "switch"}


@pytest.mark.parametrize(("ratio", "channels", "expected"), [(0, 16, 0), (0.25, 16, 4), (0.25, 12, 3), (0.5, 12, 6), (1, 12, 12)])
def test_partial_channels(ratio: float, channels: int, expected: int) -> None:
    assert partial_channels(channels, ratio) == expected


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1])
def test_partial_convolution_leaves_the_other_channels_untouched(ratio: float) -> None:
    block = make_elastic("pconv", {**FIELDS, "partial_ratio": (0.25, 0.5, 1)}, 16)
    block.set_active(config(partial_ratio=ratio, kernel_size=5), 12, 12)
    static = block.extract().eval()
    convolved = partial_channels(12, ratio)
    assert static.partial is not None and static.partial.weight.shape == (convolved, convolved, 5, 5)
    x = torch.randn(2, 12, 7, 5)
    with torch.no_grad():
        mixed = static.mix(x)
        torch.testing.assert_close(mixed[:, convolved:], x[:, convolved:], atol=0, rtol=0)
        torch.testing.assert_close(mixed[:, :convolved], static.partial(x[:, :convolved]))
        assert not torch.allclose(mixed[:, :convolved], x[:, :convolved])
        torch.testing.assert_close(static(x), x + static.mlp(mixed), atol=1e-6, rtol=0)
        torch.testing.assert_close(block(x), static(x), atol=1e-5, rtol=0)


def test_zero_ratio_is_a_pointwise_block() -> None:
    block = make_elastic("pconv", FIELDS, 16)
    block.set_active(config(partial_ratio=0), 16, 16)
    static = block.extract().eval()
    assert static.partial is None
    x = torch.randn(1, 16, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(static(x), x + static.mlp(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(block(x), static(x), atol=1e-5, rtol=0)


def test_elastic_equals_extracted_for_sampled_choices() -> None:
    block = make_elastic("pconv", FIELDS, 16)
    rng = np.random.default_rng(0)
    for trial in range(6):
        width = (16, 12, 8)[trial % 3]
        block.set_active(block.choices.sample(rng), width, width)
        x = torch.randn(3, width, 7, 5)
        with torch.no_grad():
            torch.testing.assert_close(block.extract().eval()(x), block(x), atol=1e-5, rtol=0)


def test_reorder_keeps_the_largest_choice() -> None:
    check_reorder_keeps_largest(make_elastic("pconv", FIELDS, 12), 12)


def test_macs_equal_a_hand_count() -> None:
    block = make_elastic("pconv", FIELDS, 16)
    positions, convolved, hidden = 7 * 5, 4, 32
    expected = positions * (convolved * convolved * 3 * 3 + 2 * 16 * hidden)
    assert static_macs(block, config(), 16, 7, 5) == expected


def test_static_block_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match=r"pconv\.kernel_size must be odd, got 4"):
        PartialConvBlock(config(kernel_size=4), BlockContext("image", 8, 8))
    with pytest.raises(ValueError, match="in_channels must equal out_channels"):
        PartialConvBlock(config(), BlockContext("image", 8, 16))


def test_supernet_equals_extracted_subnets() -> None:
    block = "{type: pconv, partial_ratio: [0.25, 0.5], kernel_size: [3, 5], mlp_ratio: [1, 2], activation: relu}"
    check_supernet_equals_extracted(block, "pconv")
