"""The EfficientViM block: HSM-SSD mixes channels in the N hidden states, at a cost independent of the token count."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nas.supernets.blocks import BlockChoices, BlockContext
from nas.supernets.blocks.hsm_ssd import (
    EfficientViMBlock,
    ElasticEfficientViMBlock,
    HiddenStateMixerSSD,
    HSMSSDConfig,
    state_space_duality,
)
from nas.supernets.costs import count_macs
from tests.supernets.test_elan import assert_supernet_equals_extracted, tiny_space

FIELDS = {"state_dim": (4, 6, 8), "ffn": ("glu", "mlp"), "mlp_ratio": (1, 2), "activation": ("gelu",)}


def config(state_dim: int = 8) -> HSMSSDConfig:
    return HSMSSDConfig(state_dim=state_dim, ffn="mlp", mlp_ratio=2, activation="gelu")


def test_state_space_duality_reads_every_token_through_the_mixed_hidden_states() -> None:
    torch.manual_seed(0)
    x, b, c = torch.randn(2, 6, 7, 5), torch.randn(2, 4, 7, 5), torch.randn(2, 4, 7, 5)
    weight = torch.randn(6, 6)
    mixer = lambda states: torch.tanh(states @ weight)  # noqa: E731
    tokens, b_tokens, c_tokens = x.flatten(2), b.flatten(2), c.flatten(2)
    states = torch.stack([torch.stack([(b_tokens[:, n] * tokens[:, d]).mean(-1) for d in range(6)], -1) for n in range(4)], 1)
    mixed = mixer(states)
    expected = torch.stack([sum(mixed[:, n, d, None] * c_tokens[:, n] for n in range(4)) for d in range(6)], 1)
    torch.testing.assert_close(state_space_duality(x, b, c, mixer), expected.reshape(x.shape))


def test_hidden_state_mixer_sees_n_states_whatever_the_token_count() -> None:
    mixer = HiddenStateMixerSSD(config(), BlockContext("image", 12, 12)).eval()
    shapes = []
    mixer.hidden.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        for size in [(7, 5), (16, 16)]:
            mixer(torch.randn(2, 12, *size))
    assert shapes == [(2, 8, 12), (2, 8, 12)]


@pytest.mark.parametrize(("channels", "states"), [(12, 8), (16, 4)])
def test_mixer_cost_grows_with_tokens_only_through_the_b_c_projections_and_the_two_products(channels: int, states: int) -> None:
    mixer = HiddenStateMixerSSD(config(states), BlockContext("image", channels, channels))
    per_token = 2 * channels * states + 2 * 9 * states + 2 * states * channels
    hidden_state_mixer = 3 * states * channels * channels
    for height, width in [(7, 5), (4, 4), (16, 9)]:
        assert count_macs(mixer, torch.zeros(1, channels, height, width)) == per_token * height * width + hidden_state_mixer


def test_mac_count_of_the_block_equals_hand_count() -> None:
    channels, states, pixels = 16, 8, 7 * 5
    static = EfficientViMBlock(config(states), BlockContext("image", channels, channels))
    mixer = (2 * channels * states + 2 * 9 * states + 2 * states * channels) * pixels + 3 * states * channels * channels
    ffn = 2 * channels * 2 * channels * pixels
    assert count_macs(static, torch.zeros(1, channels, 7, 5)) == mixer + ffn


def test_reorder_channels_keeps_the_largest_choice_and_sorts_the_states() -> None:
    torch.manual_seed(0)
    block = ElasticEfficientViMBlock(BlockContext("image", 16, 16), BlockChoices.build("hsm_ssd", FIELDS)).eval()
    x = torch.randn(2, 16, 7, 5)
    with torch.no_grad():
        before = block(x)
        block.reorder_channels()
        torch.testing.assert_close(block(x), before, atol=1e-5, rtol=0)
    mixer = block.token_mixer
    scores = mixer.proj_b.weight.abs().flatten(1).sum(1) + mixer.proj_c.weight.abs().flatten(1).sum(1)
    assert torch.all(scores[:-1] >= scores[1:])


def test_static_block_exports_at_any_resolution() -> None:
    torch.manual_seed(0)
    block = EfficientViMBlock(config(), BlockContext("image", 12, 12)).eval()
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
    for size in [(7, 5), (9, 11)]:
        x = torch.randn(2, 12, *size)
        with torch.no_grad():
            expected = block(x).numpy()
        assert np.abs(session.run(None, {"x": x.numpy()})[0] - expected).max() <= 1e-4


def test_supernet_of_a_tiny_space_equals_its_extracted_subnets() -> None:
    blocks = "{type: hsm_ssd, state_dim: [4, 8], ffn: [mlp, glu, hourglass], mlp_ratio: [1, 2], activation: gelu}"
    assert_supernet_equals_extracted(tiny_space(blocks), "hsm_ssd")
