"""The MS-MLP block: multi-scale shifts move each channel group by its offset, at any resolution."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nas.supernets.blocks import BlockChoices, BlockContext
from nas.supernets.blocks.ms_mlp import ElasticMSMLPBlock, MSMLPBlock, MSMLPConfig, multi_scale_shift, shift_groups
from nas.supernets.costs import count_macs
from tests.supernets.test_elan import assert_supernet_equals_extracted, tiny_space

FIELDS = {"shift_size": (3, 5, 7), "ffn": ("glu", "mlp"), "mlp_ratio": (1, 2), "activation": ("gelu", "silu")}


def reference_shift(x: torch.Tensor, shift_size: int, dim: int) -> torch.Tensor:
    """``out[:, c, ..., i] = x[:, c, ..., i - offset(c)]``, zero where ``i - offset`` falls outside, by loops."""
    out = torch.zeros_like(x)
    size = x.shape[dim]
    for start, end, offset in shift_groups(x.shape[1], shift_size):
        for index in range(size):
            source = index - offset
            if 0 <= source < size:
                out[:, start:end].select(dim, index).copy_(x[:, start:end].select(dim, source))
    return out


def test_groups_are_balanced_and_offsets_span_the_window() -> None:
    assert shift_groups(12, 5) == [(0, 2, -2), (2, 4, -1), (4, 7, 0), (7, 9, 1), (9, 12, 2)]
    assert shift_groups(3, 5) == [(0, 1, -1), (1, 2, 1), (2, 3, 2)]


@pytest.mark.parametrize("shift_size", [3, 5, 7])
@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("size", [(7, 5), (4, 9), (1, 2)])
def test_shift_moves_each_group_by_its_offset(shift_size: int, dim: int, size: tuple[int, int]) -> None:
    x = torch.randn(2, 12, *size)
    torch.testing.assert_close(multi_scale_shift(x, 12, shift_size, dim), reference_shift(x, shift_size, dim), rtol=0, atol=0)


def test_a_single_pixel_lands_at_its_groups_offsets() -> None:
    x = torch.zeros(1, 5, 7, 7)
    x[:, :, 3, 3] = 1.0
    horizontal = multi_scale_shift(x, 5, 5, -1)
    vertical = multi_scale_shift(x, 5, 5, -2)
    for channel, offset in enumerate(range(-2, 3)):
        assert horizontal[0, channel].nonzero().tolist() == [[3, 3 + offset]]
        assert vertical[0, channel].nonzero().tolist() == [[3 + offset, 3]]


def test_static_block_is_resolution_agnostic_in_onnx_runtime() -> None:
    torch.manual_seed(0)
    block = MSMLPBlock(MSMLPConfig(shift_size=5, ffn="glu", mlp_ratio=2, activation="gelu"), BlockContext("image", 12, 12)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            block,
            (torch.randn(1, 12, 7, 5),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch", 2: "height", 3: "width"}},
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for size in [(7, 5), (9, 11), (3, 2)]:
        x = torch.randn(2, 12, *size)
        with torch.no_grad():
            expected = block(x).numpy()
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - expected).max() <= 1e-4


def test_reorder_channels_keeps_the_largest_choice() -> None:
    torch.manual_seed(0)
    choices = BlockChoices.build("ms_mlp", FIELDS)
    block = ElasticMSMLPBlock(BlockContext("image", 16, 16), choices).eval()
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        before = block(x)
        block.reorder_channels()
        torch.testing.assert_close(block(x), before, atol=1e-5, rtol=0)


def test_mac_count_equals_hand_count() -> None:
    channels, pixels = 16, 7 * 5
    static = MSMLPBlock(MSMLPConfig(shift_size=5, ffn="glu", mlp_ratio=2, activation="gelu"), BlockContext("image", channels, channels))
    mixing = 2 * channels * channels
    ffn = 3 * channels * 2 * channels
    assert count_macs(static, torch.zeros(1, channels, 7, 5)) == (mixing + ffn) * pixels


def test_supernet_of_a_tiny_space_equals_its_extracted_subnets() -> None:
    blocks = "{type: ms_mlp, shift_size: [3, 5], ffn: [mlp, glu], mlp_ratio: [1, 2], activation: gelu}"
    assert_supernet_equals_extracted(tiny_space(blocks), "ms_mlp")
