"""The TCNCA block (dilated causal TCN + chunked causal attention)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nas.space.schema import parse_config
from nas.supernets.blocks import BlockChoices, BlockContext, block_type
from nas.supernets.blocks.base import field_rules
from nas.supernets.blocks.delta import DeltaNetConfig
from nas.supernets.blocks.metaformer import FFN_FIELD_NAMES, gated_softmax_attention
from nas.supernets.blocks.tcnca import TCNCA, ElasticTCNCA, TCNCAConfig, chunked_causal_attention
from nas.supernets.costs import count_macs
from nas.supernets.elastic import count_parameters
from nas.supernets.supernet import Supernet

MAX_WIDTH = 24
WIDTHS = (16, 24)
FIELDS = {
    "tcn_depth": (1, 2, 3),
    "kernel_size": (2, 3, 5),
    "chunk_size": (4, 8, 64),
    "num_heads": (1, 2),
    "head_dim": (4, 8),
    "ffn": ("glu", "mlp"),
    "mlp_ratio": (1, 2),
    "activation": ("gelu", "silu"),
}

MQAR_SPACE = """\
name: tiny_mqar_sequence_blocks
task: {dataset: mqar, input_shape: [12], num_classes: 16, vocab_size: 16, num_kv_pairs: 2, num_train: 64, num_val: 16, num_test: 16}
stem: {channels: 16, kernel_size: 4}
stages:
  - depth: [1, 2]
    width: [12, 16]
    blocks:
      - {type: tcnca, tcn_depth: [1, 2], kernel_size: [2, 3], chunk_size: [4, 8], num_heads: [1, 2], head_dim: [4, 8],
         ffn: glu, mlp_ratio: [1, 2], activation: gelu}
      - {type: delta_net, num_heads: [1, 2], head_dim: 4, householder_steps: [1, 2], negative_eigenvalues: [false, true],
         gate: [scalar, channel], ffn: mlp, mlp_ratio: 1, activation: gelu}
sequence_length: [12]
"""


def make_block() -> ElasticTCNCA:
    torch.manual_seed(0)
    block = ElasticTCNCA(BlockContext("sequence", MAX_WIDTH, MAX_WIDTH, causal=True), BlockChoices.build("tcnca", FIELDS))
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return block


def samples(block: ElasticTCNCA, count: int, seed: int) -> list[tuple[TCNCAConfig, int]]:
    rng = np.random.default_rng(seed)
    return [(block.choices.sample(rng), int(rng.choice(WIDTHS))) for _ in range(count)]


def test_registration_and_fields() -> None:
    entry = block_type("tcnca")
    assert entry.elastic_class is ElasticTCNCA and entry.static_class is TCNCA
    assert entry.modalities == frozenset({"sequence"}) and entry.reshapes is False
    assert tuple(field_rules(TCNCAConfig)) == ("tcn_depth", "kernel_size", "chunk_size", "num_heads", "head_dim", *FFN_FIELD_NAMES)


@pytest.mark.parametrize("length", [5, 19])
def test_elastic_equals_extracted(length: int) -> None:
    block = make_block().eval()
    for config, width in samples(block, 8, seed=length):
        block.set_active(config, width, width)
        static = block.extract().eval()
        fresh = TCNCA(config, BlockContext("sequence", width, width, causal=True))
        assert static.state_dict().keys() == fresh.state_dict().keys()
        assert count_parameters(static) == count_parameters(fresh)
        x = torch.randn(2, length, width)
        with torch.no_grad():
            torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0, msg=f"{config}, width {width}")


def test_causal() -> None:
    block = make_block().eval()
    for config, width in samples(block, 4, seed=11):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(2, 21, width)
        for t in (0, 7, 8, 16):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            with torch.no_grad():
                for module in (block, static):
                    before, after = module(x), module(changed)
                    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
                    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_attention_stays_inside_its_chunk() -> None:
    """A chunk as long as the sequence is causal attention; otherwise a token sees only its own chunk's past."""
    query, key, value = (torch.randn(2, 13, 2 * 4) for _ in range(3))
    full = gated_softmax_attention(query, key, value, torch.full((2, 13, 2), 30.0), 2, 4, causal=True)
    torch.testing.assert_close(chunked_causal_attention(query, key, value, 2, 4, 13), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_causal_attention(query, key, value, 2, 4, 64), full, atol=1e-5, rtol=0)
    chunked = chunked_causal_attention(query, key, value, 2, 4, 5)
    for start in (0, 5, 10):
        end = min(start + 5, 13)
        alone = chunked_causal_attention(query[:, start:end], key[:, start:end], value[:, start:end], 2, 4, 5)
        torch.testing.assert_close(chunked[:, start:end], alone, atol=1e-6, rtol=0)


def test_smaller_kernels_keep_the_trailing_taps_and_dilations_double() -> None:
    block = make_block()
    block.set_active(dataclasses.replace(block.choices.largest(), tcn_depth=3, kernel_size=3), MAX_WIDTH, MAX_WIDTH)
    static = block.extract()
    for layer, (elastic_conv, static_conv) in enumerate(zip(block.token_mixer.tcn, static.token_mixer.tcn, strict=True)):
        assert static_conv.dilation == (2**layer,)
        torch.testing.assert_close(static_conv.weight, elastic_conv.weight[..., -3:])


def test_receptive_field_of_the_tcn() -> None:
    """(kernel_size - 1) * (2 ** depth - 1) + 1 tokens: with one chunk per token the mixer sees no further back."""
    block = make_block().eval()
    config = dataclasses.replace(block.choices.largest(), tcn_depth=2, kernel_size=3, chunk_size=4)
    block.set_active(config, MAX_WIDTH, MAX_WIDTH)
    mixer = block.token_mixer
    x = torch.randn(1, 20, MAX_WIDTH)
    field = 2 * 3 + 1
    t = 15
    for changed_at, should_change in ((t - field + 1, True), (t - field, False)):
        changed = x.clone()
        changed[:, changed_at] += 1.0
        with torch.no_grad():
            hidden, hidden_changed = x, changed
            for conv in mixer.tcn[:2]:
                hidden = hidden + torch.nn.functional.silu(conv(hidden, MAX_WIDTH, 3))
                hidden_changed = hidden_changed + torch.nn.functional.silu(conv(hidden_changed, MAX_WIDTH, 3))
        assert (not torch.allclose(hidden[:, t], hidden_changed[:, t])) is should_change


def test_reorder_channels_keeps_the_largest_choice() -> None:
    block = make_block().eval()
    x = torch.randn(2, 13, MAX_WIDTH)
    with torch.no_grad():
        before = block(x)
        block.reorder_channels()
        torch.testing.assert_close(block(x), before, atol=1e-5, rtol=0)


def test_set_active_rejects_values_outside_the_choices() -> None:
    block = make_block()
    largest = block.config
    for name, value in (("tcn_depth", 4), ("kernel_size", 4), ("chunk_size", 16)):
        with pytest.raises(ValueError, match=name):
            block.set_active(dataclasses.replace(largest, **{name: value}), MAX_WIDTH, MAX_WIDTH)
    assert block.config == largest


def test_tiny_mqar_supernet_with_tcnca_and_delta_net_equals_extracted_subnets() -> None:
    space = parse_config(MQAR_SPACE).space
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    rng = np.random.default_rng(0)
    archs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(6))]
    kinds = {type(block) for arch in archs for stage in arch.stages for block in stage.blocks}
    assert {TCNCAConfig, DeltaNetConfig} <= kinds
    for arch in archs:
        x = torch.randint(0, 16, (2, arch.sequence_length))
        supernet.set_active(arch)
        static = supernet.extract().eval()
        with torch.no_grad():
            torch.testing.assert_close(static(x), supernet(x), atol=1e-5, rtol=0, msg=arch.short_name())


def test_macs_of_the_static_block_equal_a_hand_count() -> None:
    """TCN: L * C * k per layer; q, k, v, output: 4 * L * C * H * D; attention: 2 * chunks * c^2 * H * D (padded
    chunks); mlp FFN: 2 * L * C * hidden."""
    config = TCNCAConfig(tcn_depth=3, kernel_size=3, chunk_size=8, num_heads=2, head_dim=4, ffn="mlp", mlp_ratio=2, activation="gelu")
    length, channels, width, hidden = 19, 16, 8, 32
    block = TCNCA(config, BlockContext("sequence", channels, channels, causal=True))
    expected = 3 * length * channels * 3 + 4 * length * channels * width + 2 * 3 * 8 * 8 * width + 2 * length * channels * hidden
    assert count_macs(block, torch.zeros(1, length, channels)) == expected
