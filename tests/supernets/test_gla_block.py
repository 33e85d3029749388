"""The gated linear attention block."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.supernets.blocks import BlockChoices, BlockContext, block_type
from nas.supernets.blocks.base import field_rules
from nas.supernets.blocks.gla import (
    GATE_TEMPERATURE,
    ElasticGatedLinearAttention,
    GatedLinearAttention,
    GatedLinearAttentionLayer,
    GLAConfig,
)
from nas.supernets.blocks.metaformer import FFN_FIELD_NAMES, GatedAttentionConfig
from nas.supernets.elastic import count_parameters

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")

MAX_WIDTH = 32
WIDTHS = (16, 32)
FIELDS = {
    "num_heads": (1, 2, 4),
    "key_dim": (8, 16),
    "value_dim": (8, 16),
    "ffn": ("glu", "mlp"),
    "mlp_ratio": (1, 2, 4),
    "activation": ("gelu", "silu", "relu"),
}


def make_block() -> ElasticGatedLinearAttention:
    torch.manual_seed(0)
    block = ElasticGatedLinearAttention(BlockContext("sequence", MAX_WIDTH, MAX_WIDTH), BlockChoices.build("gla", FIELDS))
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return block


def samples(block: ElasticGatedLinearAttention, count: int, seed: int) -> list[tuple[GLAConfig, int]]:
    rng = np.random.default_rng(seed)
    return [(block.choices.sample(rng), int(rng.choice(WIDTHS))) for _ in range(count)]


def storages(module: torch.nn.Module) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in module.state_dict().values()}


def test_registration_and_shared_ffn_fields() -> None:
    entry = block_type("gla")
    assert entry.elastic_class is ElasticGatedLinearAttention
    assert entry.static_class is GatedLinearAttention
    assert entry.modalities == frozenset({"sequence"})
    assert entry.reshapes is False
    rules = field_rules(GLAConfig)
    assert tuple(rules) == ("num_heads", "key_dim", "value_dim", *FFN_FIELD_NAMES)
    attention_rules = field_rules(GatedAttentionConfig)
    assert all(rules[name] == attention_rules[name] for name in FFN_FIELD_NAMES)
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(GLAConfig))


@pytest.mark.parametrize("length", [5, 19])
def test_elastic_equals_extracted(length: int) -> None:
    block = make_block().eval()
    for config, width in samples(block, 8, seed=length):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(2, length, width)
        with torch.no_grad():
            expected, actual = block(x), static(x)
        assert actual.shape == x.shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=f"{config}, width {width}")


def test_extracted_matches_a_fresh_static_block_and_shares_no_storage() -> None:
    block = make_block()
    for config, width in samples(block, 6, seed=7):
        block.set_active(config, width, width)
        static = block.extract()
        fresh = GatedLinearAttention(config, BlockContext("sequence", width, width))
        assert type(static) is GatedLinearAttention
        assert static.state_dict().keys() == fresh.state_dict().keys()
        assert count_parameters(static) == count_parameters(fresh)
        assert all(tensor.is_contiguous() for tensor in static.state_dict().values())
        assert not storages(static) & storages(block)


def test_set_active_rejects_values_outside_the_choices() -> None:
    block = make_block()
    largest = block.config
    for name, value in (("num_heads", 3), ("key_dim", 12), ("value_dim", 32), ("ffn", "swiglu")):
        with pytest.raises(ValueError, match=name):
            block.set_active(dataclasses.replace(largest, **{name: value}), MAX_WIDTH, MAX_WIDTH)
    with pytest.raises(ValueError, match="in_channels must equal out_channels"):
        block.set_active(largest, 16, 32)
    assert block.config == largest


def test_layer_follows_the_paper() -> None:
    """The static GLA layer against a step-by-step recurrence written from the paper's equations."""
    torch.manual_seed(2)
    config = GLAConfig(num_heads=2, key_dim=8, value_dim=4, ffn="mlp", mlp_ratio=1, activation="gelu")
    layer = GatedLinearAttentionLayer(config, BlockContext("sequence", 16, 16))
    with torch.no_grad():
        layer.head_norm.weight.uniform_(0.5, 1.5)
        layer.head_norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 11, 16)
    with torch.no_grad():
        q = layer.query(x).unflatten(-1, (2, 8))
        k = layer.key(x).unflatten(-1, (2, 8))
        v = layer.value(x).unflatten(-1, (2, 4))
        alpha = torch.sigmoid(layer.forget_up(layer.forget_down(x))).unflatten(-1, (2, 8)) ** (1 / GATE_TEMPERATURE)
        state = torch.zeros(2, 2, 8, 4)
        outputs = []
        for t in range(x.shape[1]):
            state = alpha[:, t].unsqueeze(-1) * state + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state) * 8**-0.5)
        heads = torch.stack(outputs, dim=1)
        normed = F.layer_norm(heads, (4,), layer.head_norm.weight, layer.head_norm.bias)
        expected = layer.output(normed.flatten(2) * F.silu(layer.output_gate(x)))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_always_causal() -> None:
    block = make_block().eval()
    for config, width in samples(block, 3, seed=11):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(2, 20, width)
        for t in (0, 9, 16):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            with torch.no_grad():
                for module in (block, static):
                    before, after = module(x), module(changed)
                    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
                    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_onnx_export_matches_onnxruntime() -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    block = make_block().eval()
    for config, width in samples(block, 2, seed=3):
        block.set_active(config, width, width)
        static = block.extract().eval()
        batch = torch.randn(3, 21, width)
        with torch.no_grad():
            expected = static(batch).numpy()
        buffer = io.BytesIO()
        torch.onnx.export(
            static,
            (torch.randn(2, 21, width),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
        session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        actual = session.run(None, {"x": batch.numpy()})[0]
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_gradients_reach_every_parameter_of_the_largest_choice() -> None:
    block = make_block().train()
    block(torch.randn(2, 18, MAX_WIDTH)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
