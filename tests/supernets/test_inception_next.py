"""InceptionNeXt's block (``inception_next``): the Inception depthwise convolution, reordering, MACs, a supernet."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nas.supernets.blocks import BlockContext, block_type
from nas.supernets.blocks.inception_next import (
    ElasticInceptionNeXtBlock,
    InceptionDepthwiseConv,
    InceptionNeXtBlock,
    InceptionNeXtConfig,
    branch_channels,
)
from tests.supernets.image_block_checks import (
    check_reorder_keeps_largest,
    check_supernet_equals_extracted,
    make_elastic,
    onnx_matches,
    static_macs,
)

FIELDS = {
    "kernel_size": (3, 5),
    "band_kernel_size": (5, 7, 11),
    "conv_ratio": (0, 0.5, 0.75),
    "ffn": ("mlp", "glu"),
    "mlp_ratio": (1, 2),
    "activation": ("gelu", "relu"),
}


def config(**changes: object) -> InceptionNeXtConfig:
    base = InceptionNeXtConfig(kernel_size=3, band_kernel_size=5, conv_ratio=0.75, ffn="mlp", mlp_ratio=2, activation="gelu")
    return dataclasses.replace(base, **changes)


def test_registration() -> None:
    entry = block_type("inception_next")
    assert entry.elastic_class is ElasticInceptionNeXtBlock and entry.static_class is InceptionNeXtBlock
    assert entry.modalities == frozenset({"image"}) and entry.reshapes is False
    assert entry.shrinks["kernel_size"] == entry.shrinks["band_kernel_size"] == "kernel"
    assert entry.shrinks["conv_ratio"] == "width"


@pytest.mark.parametrize(("channels", "ratio", "expected"), [(16, 0, 0), (16, 0.375, 2), (16, 0.75, 4), (16, 1, 5), (14, 1, 4), (12, 1, 4)])
def test_branch_channels(channels: int, ratio: float, expected: int) -> None:
    assert branch_channels(channels, ratio) == expected


def test_branches_have_the_right_shapes_and_channels() -> None:
    block = make_elastic("inception_next", FIELDS, 16)
    block.set_active(config(kernel_size=5, band_kernel_size=7), 16, 16)
    mixer = block.extract().eval().token_mixer
    assert isinstance(mixer, InceptionDepthwiseConv) and mixer.branch == 4
    assert mixer.square is not None and mixer.horizontal is not None and mixer.vertical is not None
    assert mixer.square.weight.shape == (4, 1, 5, 5)
    assert mixer.horizontal.weight.shape == (4, 1, 1, 7)
    assert mixer.vertical.weight.shape == (4, 1, 7, 1)
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        out = mixer(x)
        torch.testing.assert_close(out[:, 0:4], mixer.square(x[:, 0:4]))
        torch.testing.assert_close(out[:, 4:8], mixer.horizontal(x[:, 4:8]))
        torch.testing.assert_close(out[:, 8:12], mixer.vertical(x[:, 8:12]))
        torch.testing.assert_close(out[:, 12:], x[:, 12:], atol=0, rtol=0)


def test_band_branches_mix_along_one_axis_only() -> None:
    mixer = InceptionDepthwiseConv(config(band_kernel_size=11), BlockContext("image", 12, 12)).eval()
    x = torch.randn(1, 12, 7, 5)
    changed = x.clone()
    changed[:, :, 3, 2] += 1.0
    with torch.no_grad():
        difference = (mixer(changed) - mixer(x)).abs()
    horizontal, vertical = difference[0, 3:6].sum(0), difference[0, 6:9].sum(0)
    assert horizontal[3].min() > 0 and horizontal.sum() == horizontal[3].sum()
    assert vertical[:, 2].min() > 0 and vertical.sum() == vertical[:, 2].sum()


def test_zero_conv_ratio_is_an_identity_mixer() -> None:
    block = make_elastic("inception_next", FIELDS, 16)
    block.set_active(config(conv_ratio=0), 16, 16)
    static = block.extract().eval()
    assert static.token_mixer.square is None
    x = torch.randn(1, 16, 7, 5)
    with torch.no_grad():
        torch.testing.assert_close(static.token_mixer(x), x, atol=0, rtol=0)
        torch.testing.assert_close(block(x), static(x), atol=1e-5, rtol=0)


def test_elastic_equals_extracted_and_onnx_for_sampled_choices() -> None:
    block = make_elastic("inception_next", FIELDS, 16)
    rng = np.random.default_rng(0)
    for trial in range(6):
        width = (16, 12, 14)[trial % 3]
        block.set_active(block.choices.sample(rng), width, width)
        static = block.extract().eval()
        x = torch.randn(3, width, 7, 5)
        with torch.no_grad():
            torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0)
        if trial < 2:
            assert onnx_matches(static, x) <= 1e-4


def test_reorder_keeps_the_largest_choice() -> None:
    check_reorder_keeps_largest(make_elastic("inception_next", FIELDS, 12), 12)


def test_macs_equal_a_hand_count() -> None:
    block = make_elastic("inception_next", FIELDS, 16)
    positions, branch, hidden = 7 * 5, 4, 32
    expected = positions * (branch * 3 * 3 + 2 * branch * 5 + 2 * 16 * hidden)
    assert static_macs(block, config(), 16, 7, 5) == expected


def test_supernet_equals_extracted_subnets() -> None:
    block = "{type: inception_next, kernel_size: [3, 5], band_kernel_size: [5, 7], conv_ratio: [0.375, 0.75], ffn: mlp, mlp_ratio: [1, 2], activation: gelu}"
    check_supernet_equals_extracted(block, "inception_next")
