"""The HorNet block: g^n Conv's order of interaction, its elastic order and widths, costs and use in a supernet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas.supernets.blocks import BlockChoices, BlockContext
from nas.supernets.blocks.gnconv import ElasticHorNetBlock, GnConv, GnConvConfig, HorNetBlock, level_width
from nas.supernets.costs import count_macs
from tests.supernets.test_elan import assert_supernet_equals_extracted, tiny_space

FIELDS = {"order": (1, 2, 3), "kernel_size": (3, 5), "ffn": ("mlp", "glu"), "mlp_ratio": (1, 2), "activation": ("gelu",)}


def make_block(channels: int = 16, fields: dict | None = None) -> ElasticHorNetBlock:
    torch.manual_seed(0)
    block = ElasticHorNetBlock(BlockContext("image", channels, channels), BlockChoices.build("gnconv", fields or FIELDS))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return block.eval()


def config(order: int, kernel_size: int = 5) -> GnConvConfig:
    return GnConvConfig(order=order, kernel_size=kernel_size, ffn="mlp", mlp_ratio=2, activation="gelu")


def static_mixer(order: int, channels: int = 12) -> GnConv:
    torch.manual_seed(order)
    mixer = GnConv(config(order), BlockContext("image", channels, channels))
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    return mixer


def test_order_one_is_a_gated_convolution() -> None:
    mixer = static_mixer(1)
    x = torch.randn(2, 12, 7, 5)
    projected = F.conv2d(x, mixer.proj_in.weight, mixer.proj_in.bias)
    value, gate = projected[:, :12], projected[:, 12:]
    gate = F.conv2d(gate, mixer.depthwise.weight, mixer.depthwise.bias, padding=2, groups=12)
    expected = F.conv2d(value * gate, mixer.proj_out.weight, mixer.proj_out.bias)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), expected)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_order_n_without_biases_is_a_homogeneous_polynomial_of_degree_n_plus_1(order: int) -> None:
    mixer = static_mixer(order)
    with torch.no_grad():
        for name, parameter in mixer.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
        x = torch.randn(1, 12, 7, 5, dtype=torch.float64)
        mixer = mixer.double()
        torch.testing.assert_close(mixer(2.0 * x), 2.0 ** (order + 1) * mixer(x))


@pytest.mark.parametrize(("channels", "order", "widths"), [(16, 3, [4, 8, 16]), (12, 3, [3, 6, 12]), (12, 4, [1, 3, 6, 12]), (10, 3, [2, 5, 10])])
def test_level_widths_round_down_when_the_width_is_not_divisible(channels: int, order: int, widths: list[int]) -> None:
    assert [level_width(channels, level) for level in reversed(range(order))] == widths
    mixer = GnConv(config(order), BlockContext("image", channels, channels))
    assert mixer.proj_in.out_channels == widths[0] + sum(widths)
    assert mixer(torch.randn(1, channels, 7, 5)).shape == (1, channels, 7, 5)


@pytest.mark.parametrize("channels", [12, 10])
def test_every_order_and_kernel_is_sliced_from_the_largest_orders_weights(channels: int) -> None:
    block = make_block(fields={**FIELDS, "ffn": ("mlp",), "mlp_ratio": (2,)})
    x = torch.randn(2, channels, 7, 5)
    for choice in block.choices.configs():
        block.set_active(choice, channels, channels)
        static = block.extract().eval()
        assert len(static.token_mixer.pointwise) == choice.order - 1
        with torch.no_grad():
            torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0)


def test_smaller_orders_drop_the_narrowest_recursion_steps() -> None:
    block = make_block()
    mixer = block.token_mixer
    block.set_active(config(2), 16, 16)
    static = block.extract()
    torch.testing.assert_close(static.token_mixer.pointwise[0].weight, mixer.pointwise[0].weight)
    torch.testing.assert_close(static.token_mixer.proj_in.weight[:8], mixer.proj_p.weight[:8])
    torch.testing.assert_close(static.token_mixer.proj_in.weight[8:16], mixer.proj_q[1].weight)
    torch.testing.assert_close(static.token_mixer.proj_in.weight[16:], mixer.proj_q[0].weight)


def test_reorder_channels_keeps_the_largest_choice() -> None:
    block = make_block()
    block.set_active(BlockChoices.build("gnconv", FIELDS).largest(), 16, 16)
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        before = block(x)
        block.reorder_channels()
        torch.testing.assert_close(block(x), before, atol=1e-5, rtol=0)


def test_mac_count_equals_hand_count() -> None:
    channels, pixels = 16, 7 * 5
    static = HorNetBlock(config(2, kernel_size=3), BlockContext("image", channels, channels))
    proj_in = channels * (8 + 8 + 16)
    depthwise = (8 + 16) * 9
    pointwise = 8 * 16
    proj_out = channels * channels
    ffn = 2 * channels * 2 * channels
    assert count_macs(static, torch.zeros(1, channels, 7, 5)) == (proj_in + depthwise + pointwise + proj_out + ffn) * pixels


def test_supernet_of_a_tiny_space_equals_its_extracted_subnets() -> None:
    blocks = "{type: gnconv, order: [1, 2, 3], kernel_size: [3, 5], ffn: [mlp, glu, hourglass], mlp_ratio: [1, 2], activation: gelu}"
    assert_supernet_equals_extracted(tiny_space(blocks), "gnconv")
