"""The delta-rule block (Gated DeltaNet / KDA / DeltaProduct / negative eigenvalues)."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.space.schema import parse_config
from nas.supernets.blocks import BlockChoices, BlockContext, block_type
from nas.supernets.blocks.base import field_rules
from nas.supernets.blocks.delta import (
    GATE_TEMPERATURE,
    DeltaNet,
    DeltaNetConfig,
    DeltaRuleLayer,
    ElasticDeltaNet,
)
from nas.supernets.blocks.metaformer import FFN_FIELD_NAMES
from nas.supernets.elastic import count_parameters
from nas.supernets.supernet import Supernet

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")

MAX_WIDTH = 24
WIDTHS = (16, 24)
FIELDS = {
    "num_heads": (1, 2),
    "head_dim": (4, 8),
    "householder_steps": (1, 2, 3),
    "negative_eigenvalues": (False, True),
    "gate": ("scalar", "channel"),
    "ffn": ("glu", "mlp"),
    "mlp_ratio": (1, 2),
    "activation": ("gelu", "silu"),
}

MQAR_SPACE = """\
name: tiny_mqar_delta
task: {dataset: mqar, input_shape: [12], num_classes: 16, vocab_size: 16, num_kv_pairs: 2, num_train: 64, num_val: 16, num_test: 16}
stem: {channels: 16, kernel_size: 4}
stages:
  - depth: [1, 2]
    width: [12, 16]
    blocks:
      - {type: delta_net, num_heads: [1, 2], head_dim: [4, 8], householder_steps: [1, 2], negative_eigenvalues: [false, true],
         gate: [scalar, channel], ffn: glu, mlp_ratio: [1, 2], activation: gelu}
      - {type: gla, num_heads: [1, 2], key_dim: 8, value_dim: 8, ffn: mlp, mlp_ratio: 1, activation: gelu}
sequence_length: [12]
"""


def make_block() -> ElasticDeltaNet:
    torch.manual_seed(0)
    block = ElasticDeltaNet(BlockContext("sequence", MAX_WIDTH, MAX_WIDTH, causal=True), BlockChoices.build("delta_net", FIELDS))
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            elif "forget_up.bias" in name:
                parameter.copy_(torch.randn_like(parameter) * 3.0 - 20.0)
    return block


def samples(block: ElasticDeltaNet, count: int, seed: int) -> list[tuple[DeltaNetConfig, int]]:
    rng = np.random.default_rng(seed)
    return [(block.choices.sample(rng), int(rng.choice(WIDTHS))) for _ in range(count)]


def test_registration_and_fields() -> None:
    entry = block_type("delta_net")
    assert entry.elastic_class is ElasticDeltaNet and entry.static_class is DeltaNet
    assert entry.modalities == frozenset({"sequence"}) and entry.reshapes is False
    assert tuple(field_rules(DeltaNetConfig)) == (
        "num_heads", "head_dim", "householder_steps", "negative_eigenvalues", "gate", *FFN_FIELD_NAMES,
    )  # fmt: skip


@pytest.mark.parametrize("length", [5, 19])
def test_elastic_equals_extracted(length: int) -> None:
    block = make_block().eval()
    for config, width in samples(block, 6, seed=length):
        block.set_active(config, width, width)
        static = block.extract().eval()
        fresh = DeltaNet(config, BlockContext("sequence", width, width, causal=True))
        assert static.state_dict().keys() == fresh.state_dict().keys()
        assert count_parameters(static) == count_parameters(fresh)
        x = torch.randn(2, length, width)
        with torch.no_grad():
            torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0, msg=f"{config}, width {width}")


def test_set_active_rejects_values_outside_the_choices() -> None:
    block = make_block()
    largest = block.config
    for name, value in (("householder_steps", 4), ("head_dim", 6), ("gate", "vector")):
        with pytest.raises(ValueError, match=name):
            block.set_active(dataclasses.replace(largest, **{name: value}), MAX_WIDTH, MAX_WIDTH)
    assert block.config == largest


def test_causal() -> None:
    block = make_block().eval()
    for config, width in samples(block, 3, seed=11):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(2, 21, width)
        for t in (0, 8, 16):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            with torch.no_grad():
                for module in (block, static):
                    before, after = module(x), module(changed)
                    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
                    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def causal_conv(layer: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """x: [B, L, C] -> [B, L, C], out[t] = sum_i w[i] x[t - (k - 1) + i]."""
    kernel = layer.weight[:, 0]
    padded = F.pad(x, (0, 0, kernel.shape[1] - 1, 0))
    return torch.stack([padded[:, i : i + x.shape[1]] * kernel[:, i] for i in range(kernel.shape[1])]).sum(0)


@pytest.mark.parametrize("negative_eigenvalues", [False, True])
def test_one_step_with_scalar_gate_is_gated_deltanet(negative_eigenvalues: bool) -> None:
    """n_h = 1, scalar gate: S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = K^-1/2 S_t^T q_t."""
    torch.manual_seed(2)
    heads, dim = 2, 8
    config = DeltaNetConfig(heads, dim, 1, negative_eigenvalues, "scalar", "mlp", 1, "gelu")
    layer = DeltaRuleLayer(config, BlockContext("sequence", 16, 16, causal=True))
    with torch.no_grad():
        layer.head_norm.weight.uniform_(0.5, 1.5)
        layer.head_norm.bias.uniform_(-0.5, 0.5)
        layer.forget_up.bias.uniform_(-40.0, -10.0)
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        q = F.normalize(F.silu(causal_conv(layer.query_conv, layer.query(x))).unflatten(-1, (heads, dim)), dim=-1)
        k = F.normalize(F.silu(causal_conv(layer.key_conv, layer.key(x))).unflatten(-1, (heads, dim)), dim=-1)
        v = F.silu(causal_conv(layer.value_conv, layer.value(x))).unflatten(-1, (heads, dim))
        beta = torch.sigmoid(layer.beta(x)) * (2.0 if negative_eigenvalues else 1.0)
        alpha = torch.sigmoid(layer.forget_up(layer.forget_down(x))) ** (1 / GATE_TEMPERATURE)
        assert alpha.shape == (2, 19, heads)
        state = torch.zeros(2, heads, dim, dim)
        eye = torch.eye(dim)
        outputs = []
        for t in range(x.shape[1]):
            key = k[:, t].unsqueeze(-1)
            householder = eye - beta[:, t, :, None, None] * key @ key.transpose(-1, -2)
            state = alpha[:, t, :, None, None] * householder @ state + beta[:, t, :, None, None] * key @ v[:, t].unsqueeze(-2)
            outputs.append((state.transpose(-1, -2) @ q[:, t].unsqueeze(-1)).squeeze(-1) * dim**-0.5)
        heads_out = F.layer_norm(torch.stack(outputs, dim=1), (dim,), layer.head_norm.weight, layer.head_norm.bias)
        expected = layer.output(heads_out.flatten(2) * F.silu(layer.output_gate(x)))
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_reorder_channels_keeps_the_largest_choice() -> None:
    block = make_block().eval()
    for gate in ("scalar", "channel"):
        block.set_active(dataclasses.replace(block.choices.largest(), gate=gate), MAX_WIDTH, MAX_WIDTH)
        x = torch.randn(2, 13, MAX_WIDTH)
        with torch.no_grad():
            before = block(x)
            block.reorder_channels()
            torch.testing.assert_close(block(x), before, atol=1e-5, rtol=0)


def test_onnx_export_of_several_chunks_matches_onnxruntime() -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    block = make_block().eval()
    block.set_active(DeltaNetConfig(2, 8, 3, True, "channel", "glu", 2, "gelu"), 16, 16)
    static = block.extract().eval()
    batch = torch.randn(3, 21, 16)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            static, (torch.randn(2, 21, 16),), buffer, dynamo=False, opset_version=17, input_names=["x"],
            output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )  # fmt: skip
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = static(batch).numpy()
    np.testing.assert_allclose(session.run(None, {"x": batch.numpy()})[0], expected, atol=1e-4, rtol=0)


def test_gradients_reach_the_largest_choice() -> None:
    block = make_block().train()
    block.set_active(dataclasses.replace(block.choices.largest(), gate="channel"), MAX_WIDTH, MAX_WIDTH)
    block(torch.randn(2, 18, MAX_WIDTH)).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_tiny_mqar_supernet_equals_extracted_subnets() -> None:
    space = parse_config(MQAR_SPACE).space
    torch.manual_seed(0)
    supernet = Supernet(space).eval()
    rng = np.random.default_rng(0)
    archs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(4))]
    assert any(block.__class__ is DeltaNetConfig for arch in archs for stage in arch.stages for block in stage.blocks)
    for arch in archs:
        x = torch.randint(0, 16, (2, arch.sequence_length))
        supernet.set_active(arch)
        static = supernet.extract().eval()
        with torch.no_grad():
            torch.testing.assert_close(static(x), supernet(x), atol=1e-5, rtol=0, msg=arch.short_name())
