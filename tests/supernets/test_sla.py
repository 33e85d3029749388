"""The SLAB block: simplified linear attention, causal on sequences, batch norm folded away at extraction."""

from __future__ import annotations

import dataclasses
import io
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F

from nas.supernets.blocks import BlockChoices, BlockContext
from nas.supernets.blocks.sla import ElasticSLABlock, simplified_linear_attention
from tests.helpers import randomise_batch_norm

FIELDS = {
    "num_heads": (1, 2),
    "head_dim": (4, 8),
    "norm": ("repbn", "layer_norm"),
    "ffn": ("glu", "mlp", "hourglass"),
    "mlp_ratio": (1, 2),
    "activation": ("gelu", "relu"),
}


def make_block(modality: str, width: int = 16) -> ElasticSLABlock:
    torch.manual_seed(0)
    block = ElasticSLABlock(BlockContext(modality, width, width, causal=modality == "sequence"), BlockChoices.build("sla", FIELDS))
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    randomise_batch_norm(block)
    return block.eval()


def test_linear_form_equals_the_normalised_quadratic_form() -> None:
    torch.manual_seed(1)
    query, key, value = (torch.randn(2, 7, 2 * 4) for _ in range(3))
    scores = F.relu(query.unflatten(-1, (2, 4)).transpose(1, 2)) @ F.relu(key.unflatten(-1, (2, 4)).transpose(1, 2)).transpose(-2, -1)
    expected = (scores @ value.unflatten(-1, (2, 4)).transpose(1, 2)) / (scores.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(simplified_linear_attention(query, key, value, 2, 4, causal=False), expected.transpose(1, 2).flatten(2))
    causal = simplified_linear_attention(query, key, value, 2, 4, causal=True)
    first = simplified_linear_attention(query[:, :1], key[:, :1], value[:, :1], 2, 4, causal=False)
    torch.testing.assert_close(causal[:, :1], first)


@pytest.mark.parametrize("norm", ["repbn", "layer_norm"])
def test_sequence_block_is_causal(norm: str) -> None:
    block = make_block("sequence")
    block.set_active(dataclasses.replace(block.choices.largest(), norm=norm), 16, 16)
    x = torch.randn(2, 9, 16)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, 16)
    with torch.no_grad():
        for module in (block, block.extract().eval()):
            torch.testing.assert_close(module(x)[:, :5], module(changed)[:, :5])
            assert not torch.allclose(module(x)[:, 5:], module(changed)[:, 5:])


@pytest.mark.parametrize("modality", ["image", "sequence"])
def test_repbn_folds_away_and_the_exported_graph_has_no_normalisation(modality: str) -> None:
    block = make_block(modality)
    config = dataclasses.replace(block.choices.largest(), norm="repbn", ffn="glu")
    block.set_active(config, 12, 12)
    static = block.extract().eval()
    assert static.norm1 is None and static.norm2 is None
    assert not any(isinstance(module, torch.nn.BatchNorm2d | torch.nn.LayerNorm) for module in static.modules())
    x = torch.randn(2, 12, 7, 5) if modality == "image" else torch.randn(2, 9, 12)
    with torch.no_grad():
        torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=1e-5)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(static, (x,), buffer, dynamo=False, opset_version=17)
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert not ops & {"BatchNormalization", "LayerNormalization", "ReduceMean"}, ops


@pytest.mark.parametrize("modality", ["image", "sequence"])
def test_reorder_keeps_the_largest_choice(modality: str) -> None:
    block = make_block(modality)
    x = torch.randn(2, 16, 7, 5) if modality == "image" else torch.randn(2, 9, 16)
    for norm in ("repbn", "layer_norm"):
        block.set_active(dataclasses.replace(block.choices.largest(), norm=norm, ffn="hourglass"), 16, 16)
        with torch.no_grad():
            before = block(x)
            block.reorder_channels()
            torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-5)
