"""PoolFormer's block (``pool_mixer``): the pooling mixer, ONNX at odd sizes, reordering, MACs, a supernet."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nas.supernets.blocks import BlockContext, block_type
from nas.supernets.blocks.base import field_rules
from nas.supernets.blocks.metaformer import FFN_FIELD_NAMES
from nas.supernets.blocks.pool_mixer import ElasticPoolFormerBlock, PoolFormerBlock, PoolMixer, PoolMixerConfig
from nas.supernets.elastic import count_parameters
from tests.supernets.image_block_checks import (
    check_reorder_keeps_largest,
    check_supernet_equals_extracted,
    make_elastic,
    onnx_matches,
    static_macs,
)

FIELDS = {"pool_size": (3, 5, 7), "ffn": ("mlp", "glu"), "mlp_ratio": (1, 2), "activation": ("gelu", "relu")}


def config(**changes: object) -> PoolMixerConfig:
    return dataclasses.replace(PoolMixerConfig(pool_size=3, ffn="mlp", mlp_ratio=2, activation="gelu"), **changes)


def test_registration() -> None:
    entry = block_type("pool_mixer")
    assert entry.elastic_class is ElasticPoolFormerBlock and entry.static_class is PoolFormerBlock
    assert entry.modalities == frozenset({"image"}) and entry.reshapes is False
    assert tuple(field_rules(PoolMixerConfig)) == ("pool_size", *FFN_FIELD_NAMES)
    assert entry.shrinks["pool_size"] == "kernel"


@pytest.mark.parametrize("pool_size", [3, 5])
def test_mixer_is_the_average_of_the_in_bounds_window_minus_the_input(pool_size: int) -> None:
    mixer = PoolMixer(config(pool_size=pool_size), BlockContext("image", 4, 4))
    x = torch.randn(2, 4, 7, 5)
    radius = pool_size // 2
    expected = torch.empty_like(x)
    for row in range(7):
        for column in range(5):
            window = x[:, :, max(0, row - radius) : row + radius + 1, max(0, column - radius) : column + radius + 1]
            expected[:, :, row, column] = window.mean((2, 3)) - x[:, :, row, column]
    torch.testing.assert_close(mixer(x), expected, atol=1e-6, rtol=0)
    assert count_parameters(mixer) == 0


def test_block_adds_the_mixer_and_the_ffn_as_residuals() -> None:
    block = make_elastic("pool_mixer", FIELDS, 8)
    block.set_active(config(pool_size=5), 8, 8)
    static = block.extract().eval()
    x = torch.randn(1, 8, 7, 5)
    with torch.no_grad():
        mixed = x + static.scale1.weight.view(1, -1, 1, 1) * static.token_mixer(static.norm1(x))
        tokens = static.norm2(mixed).flatten(2).transpose(1, 2)
        expected = mixed + static.scale2.weight.view(1, -1, 1, 1) * static.ffn(tokens).transpose(1, 2).reshape(x.shape)
        torch.testing.assert_close(static(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool_size", [3, 5, 7, 9, 11])
def test_average_pool_without_padding_exports_and_matches_onnx_runtime_at_odd_sizes(pool_size: int) -> None:
    static = PoolFormerBlock(config(pool_size=pool_size), BlockContext("image", 6, 6))
    assert onnx_matches(static, torch.randn(2, 6, 7, 5)) <= 1e-4


def test_reorder_keeps_the_largest_choice() -> None:
    check_reorder_keeps_largest(make_elastic("pool_mixer", FIELDS, 12), 12)


@pytest.mark.parametrize("ffn", ["mlp", "glu"])
def test_macs_equal_a_hand_count(ffn: str) -> None:
    block = make_elastic("pool_mixer", FIELDS, 16)
    hidden, positions = 32, 7 * 5
    projections = 3 if ffn == "glu" else 2
    assert static_macs(block, config(ffn=ffn), 16, 7, 5) == positions * projections * 16 * hidden


def test_supernet_equals_extracted_subnets() -> None:
    block = "{type: pool_mixer, pool_size: [3, 5], ffn: mlp, mlp_ratio: [1, 2], activation: gelu}"
    check_supernet_equals_extracted(block, "pool_mixer")
