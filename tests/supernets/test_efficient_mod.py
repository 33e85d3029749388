"""EfficientMod's block (``efficient_mod``): the modulation, reordering, MACs, a supernet."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from nas.supernets.blocks import BlockContext, block_type
from nas.supernets.blocks.efficient_mod import EfficientModBlock, EfficientModConfig, EfficientModulation, ElasticEfficientModBlock
from tests.supernets.image_block_checks import (
    check_reorder_keeps_largest,
    check_supernet_equals_extracted,
    make_elastic,
    onnx_matches,
    static_macs,
)

FIELDS = {"context_kernel_size": (3, 5, 7), "expand_ratio": (1, 2), "ffn": ("mlp", "glu"), "mlp_ratio": (1, 2), "activation": ("gelu", "silu")}


def config(**changes: object) -> EfficientModConfig:
    return dataclasses.replace(EfficientModConfig(context_kernel_size=3, expand_ratio=2, ffn="mlp", mlp_ratio=2, activation="gelu"), **changes)


def test_registration() -> None:
    entry = block_type("efficient_mod")
    assert entry.elastic_class is ElasticEfficientModBlock and entry.static_class is EfficientModBlock
    assert entry.modalities == frozenset({"image"}) and entry.reshapes is False
    assert entry.shrinks["context_kernel_size"] == "kernel" and entry.shrinks["expand_ratio"] == "width"


def test_output_is_linear_in_the_value_branch() -> None:
    torch.manual_seed(0)
    mixer = EfficientModulation(config(), BlockContext("image", 8, 8)).eval()
    x = torch.randn(2, 8, 7, 5)
    bias = mixer.output.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        before = mixer(x) - bias
        mixer.value.weight.mul_(3.0)
        mixer.value.bias.mul_(3.0)
        torch.testing.assert_close(mixer(x) - bias, 3.0 * before, atol=1e-5, rtol=1e-5)


def test_context_sees_only_its_kernel_window() -> None:
    torch.manual_seed(0)
    mixer = EfficientModulation(config(context_kernel_size=3), BlockContext("image", 8, 8)).eval()
    x = torch.randn(1, 8, 7, 5)
    changed = x.clone()
    changed[:, :, 3, 2] += 1.0
    with torch.no_grad():
        difference = (mixer(changed) - mixer(x)).abs().sum(1)[0]
    assert difference[2:5, 1:4].min() > 0
    difference[2:5, 1:4] = 0
    assert difference.sum() == 0


def test_elastic_equals_extracted_and_onnx_for_sampled_choices() -> None:
    block = make_elastic("efficient_mod", FIELDS, 16)
    rng = np.random.default_rng(0)
    for trial in range(6):
        width = (16, 12, 8)[trial % 3]
        block.set_active(block.choices.sample(rng), width, width)
        static = block.extract().eval()
        x = torch.randn(3, width, 7, 5)
        with torch.no_grad():
            torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0)
        if trial < 2:
            assert onnx_matches(static, x) <= 1e-4


def test_reorder_keeps_the_largest_choice_and_sorts_the_modulated_channels() -> None:
    block = make_elastic("efficient_mod", FIELDS, 12)
    check_reorder_keeps_largest(block, 12)
    importance = block.token_mixer.output.weight.detach().abs().sum((0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:])


def test_macs_equal_a_hand_count() -> None:
    block = make_elastic("efficient_mod", FIELDS, 16)
    channels, width, hidden = 16, 32, 32
    modulation = channels * width + width * 3 * 3 + width * width + channels * width + width * channels
    assert static_macs(block, config(), 16, 7, 5) == 7 * 5 * (modulation + 2 * channels * hidden)


def test_supernet_equals_extracted_subnets() -> None:
    block = "{type: efficient_mod, context_kernel_size: [3, 5], expand_ratio: [1, 2], ffn: mlp, mlp_ratio: [1, 2], activation: gelu}"
    check_supernet_equals_extracted(block, "efficient_mod")
