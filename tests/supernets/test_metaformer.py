"""The MetaFormer skeleton, the shared FFN and the gated attention block."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.supernets.blocks import BlockChoices, BlockContext, block_type
from nas.supernets.blocks.base import field_rules
from nas.supernets.blocks.metaformer import (
    FFN_FIELD_NAMES,
    ElasticGatedAttention,
    FeedForward,
    GatedAttention,
    GatedAttentionConfig,
    GatedSelfAttention,
)
from nas.supernets.elastic import count_parameters

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")

MAX_WIDTH = 32
WIDTHS = (16, 32)
FIELDS = {
    "num_heads": (1, 2, 4),
    "head_dim": (8, 16),
    "ffn": ("glu", "mlp"),
    "mlp_ratio": (1, 2, 4),
    "activation": ("gelu", "silu", "relu"),
}


def make_block(modality: str = "sequence", causal: bool = False) -> ElasticGatedAttention:
    torch.manual_seed(0)
    context = BlockContext(modality, MAX_WIDTH, MAX_WIDTH, causal=causal)
    block = ElasticGatedAttention(context, BlockChoices.build("gated_attention", FIELDS))
    return randomize_norms(block)


def randomize_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Give LayerNorm scales and shifts non-trivial values, so that slicing mistakes show."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return module


def samples(block: ElasticGatedAttention, count: int, seed: int) -> list[tuple[GatedAttentionConfig, int]]:
    rng = np.random.default_rng(seed)
    return [(block.choices.sample(rng), int(rng.choice(WIDTHS))) for _ in range(count)]


def storages(module: torch.nn.Module) -> set[int]:
    return {tensor.untyped_storage().data_ptr() for tensor in module.state_dict().values()}


def onnx_outputs(module: torch.nn.Module, x: torch.Tensor, batch: torch.Tensor) -> np.ndarray:
    """Export ``module`` at ``x`` with a dynamic batch axis and run it in ONNX Runtime on ``batch``."""
    onnxruntime = pytest.importorskip("onnxruntime")
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (x,),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": batch.numpy()})[0]


def test_registration_and_field_order() -> None:
    entry = block_type("gated_attention")
    assert entry.elastic_class is ElasticGatedAttention
    assert entry.static_class is GatedAttention
    assert entry.modalities == frozenset({"image", "sequence"})
    assert entry.reshapes is False
    assert tuple(field_rules(GatedAttentionConfig)) == ("num_heads", "head_dim", *FFN_FIELD_NAMES, "qk_ratio", "output_gate")
    assert entry.defaults == {"qk_ratio": 1.0, "output_gate": True}


def test_slimmed_queries_and_keys_and_the_gate_switch() -> None:
    """LowFormer-style slimming: queries and keys of round(head_dim * qk_ratio) dims per head, values of head_dim;
    without the gate the block is plain multi-head attention."""
    fields = {**FIELDS, "qk_ratio": (0.5, 1.0), "output_gate": (False, True)}
    block = randomize_norms(ElasticGatedAttention(BlockContext("sequence", MAX_WIDTH, MAX_WIDTH, causal=True), BlockChoices.build("gated_attention", fields)))
    block.eval()
    x = torch.randn(2, 7, MAX_WIDTH)
    config = dataclasses.replace(block.choices.largest(), num_heads=2, head_dim=16, qk_ratio=0.5, output_gate=False)
    block.set_active(config, MAX_WIDTH, MAX_WIDTH)
    static = block.extract().eval()
    mixer = static.token_mixer
    assert (mixer.query.out_features, mixer.key.out_features, mixer.value.out_features) == (16, 16, 32) and mixer.gate is None
    with torch.no_grad():
        torch.testing.assert_close(static(x), block(x), atol=1e-5, rtol=0)
        tokens = static.norm1(x)
        q, k, v = (layer(tokens).unflatten(-1, (2, -1)).transpose(1, 2) for layer in (mixer.query, mixer.key, mixer.value))
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        torch.testing.assert_close(mixer(tokens), mixer.output(expected), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        block.set_active(block.choices.largest(), MAX_WIDTH, MAX_WIDTH)
        before = block(x)
        block.reorder_channels()
        torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-5)


def test_fields_with_defaults_keep_old_space_files_archs_and_digests() -> None:
    """A space file and an arch written before qk_ratio and output_gate existed read as before: the fields take their
    defaults, the arch JSON leaves them out, and the space's repr (the digest hardware profiles store) is unchanged."""
    from nas.space.schema import load_config, parse_config
    from nas.supernets.space import Arch, ArchError

    space = load_config("mqar_quick").space
    choices = space.stages[0].blocks[0]
    assert choices["qk_ratio"] == (1.0,) and choices["output_gate"] == (True,)
    assert "qk_ratio" not in repr(space) and "output_gate" not in repr(space)
    arch = space.largest()
    assert "qk_ratio" not in arch.to_json() and Arch.from_json(arch.to_json(), space) == arch
    text = (
        (Path(__file__).resolve().parents[2] / "search_spaces" / "mqar_quick.yaml")
        .read_text()
        .replace("head_dim: [16, 32]", "head_dim: [16, 32]\n        qk_ratio: [0.5]")
    )
    slim_space = parse_config(text).space
    data = json.loads(slim_space.largest().to_json())
    del data["stages"][0]["blocks"][0]["qk_ratio"]
    with pytest.raises(ArchError, match=r"qk_ratio: is required: one of \[0.5\]"):
        Arch.from_dict(data, slim_space)
    slim = dataclasses.replace(arch.stages[0].blocks[0], qk_ratio=0.5, output_gate=False)
    assert '"qk_ratio": 0.5' in dataclasses.replace(arch, stages=(dataclasses.replace(arch.stages[0], blocks=(slim,)),)).to_json()


@pytest.mark.parametrize("seed", range(3))
def test_elastic_equals_extracted_on_images(seed: int) -> None:
    block = make_block("image").eval()
    for config, width in samples(block, 4, seed):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(2, width, 5, 3)
        with torch.no_grad():
            expected, actual = block(x), static(x)
        assert actual.shape == x.shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=f"{config}, width {width}")


@pytest.mark.parametrize("causal", [False, True])
def test_elastic_equals_extracted_on_sequences(causal: bool) -> None:
    block = make_block("sequence", causal).eval()
    for config, width in samples(block, 8, seed=int(causal)):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(3, 7, width)
        with torch.no_grad():
            expected, actual = block(x), static(x)
        assert actual.shape == x.shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0, msg=f"{config}, width {width}")


def test_largest_choice_is_active_by_default() -> None:
    block = make_block().eval()
    assert block.config == GatedAttentionConfig(num_heads=4, head_dim=16, ffn="glu", mlp_ratio=4, activation="gelu")
    x = torch.randn(2, 6, MAX_WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(block.extract().eval()(x), block(x), atol=1e-5, rtol=0)


def test_extracted_matches_a_fresh_static_block_and_shares_no_storage() -> None:
    block = make_block("image")
    for config, width in samples(block, 6, seed=7):
        block.set_active(config, width, width)
        static = block.extract()
        fresh = GatedAttention(config, BlockContext("image", width, width))
        assert type(static) is GatedAttention
        assert static.state_dict().keys() == fresh.state_dict().keys()
        assert count_parameters(static) == count_parameters(fresh)
        assert all(tensor.is_contiguous() for tensor in static.state_dict().values())
        assert not storages(static) & storages(block)


def test_ffn_kinds() -> None:
    config = GatedAttentionConfig(num_heads=1, head_dim=8, ffn="mlp", mlp_ratio=2, activation="relu")
    mlp = FeedForward(config, 16)
    assert mlp.gate is None and mlp.up.out_features == 32
    glu = FeedForward(dataclasses.replace(config, ffn="glu"), 16)
    x = torch.randn(4, 16)
    expected = glu.down(F.relu(glu.gate(x)) * glu.up(x))
    torch.testing.assert_close(glu(x), expected)
    only_mlp = ElasticGatedAttention(BlockContext("sequence", 16, 16), BlockChoices.build("gated_attention", {**FIELDS, "ffn": ("mlp",)}))
    assert only_mlp.ffn.gate is None
    assert only_mlp.ffn.squeeze is None and only_mlp.ffn.expand is None


def test_hourglass_ffn_keeps_its_skip_at_the_wide_width() -> None:
    """Hourglass: z = up(x) (C -> hidden), z + expand(act(squeeze(z))) through a bottleneck of the block width,
    then down; 16 -> 64 -> 16 -> 64 -> 16 for mlp_ratio 4."""
    config = GatedAttentionConfig(num_heads=1, head_dim=8, ffn="hourglass", mlp_ratio=4, activation="gelu")
    hourglass = FeedForward(config, 16)
    assert hourglass.squeeze is not None and hourglass.expand is not None
    assert (hourglass.up.out_features, hourglass.squeeze.out_features, hourglass.expand.out_features) == (64, 16, 64)
    x = torch.randn(3, 5, 16)
    wide = hourglass.up(x)
    torch.testing.assert_close(hourglass(x), hourglass.down(wide + hourglass.expand(F.gelu(hourglass.squeeze(wide)))))
    with torch.no_grad():
        hourglass.expand.weight.zero_()
        hourglass.expand.bias.zero_()
    torch.testing.assert_close(hourglass(x), hourglass.down(hourglass.up(x)))


def test_hourglass_elastic_slices_and_reorders() -> None:
    fields = {**FIELDS, "ffn": ("hourglass", "mlp")}
    block = randomize_norms(ElasticGatedAttention(BlockContext("sequence", MAX_WIDTH, MAX_WIDTH), BlockChoices.build("gated_attention", fields)))
    block.eval()
    x = torch.randn(2, 6, MAX_WIDTH)
    largest = dataclasses.replace(block.choices.largest(), ffn="hourglass")
    for config, width in [(largest, MAX_WIDTH), (dataclasses.replace(largest, mlp_ratio=1, num_heads=1), 16)]:
        block.set_active(config, width, width)
        with torch.no_grad():
            torch.testing.assert_close(block(x[..., :width]), block.extract().eval()(x[..., :width]), atol=1e-5, rtol=0)
    block.set_active(largest, MAX_WIDTH, MAX_WIDTH)
    with torch.no_grad():
        before = block(x)
        block.reorder_channels()
        torch.testing.assert_close(block(x), before, atol=1e-5, rtol=1e-5)


def test_set_active_rejects_values_outside_the_choices() -> None:
    block = make_block()
    largest = block.config
    with pytest.raises(ValueError, match="num_heads"):
        block.set_active(dataclasses.replace(largest, num_heads=3), MAX_WIDTH, MAX_WIDTH)
    with pytest.raises(ValueError, match="mlp_ratio"):
        block.set_active(dataclasses.replace(largest, mlp_ratio=3), MAX_WIDTH, MAX_WIDTH)
    with pytest.raises(ValueError, match="in_channels"):
        block.set_active(largest, MAX_WIDTH + 1, MAX_WIDTH + 1)
    with pytest.raises(ValueError, match="in_channels must equal out_channels"):
        block.set_active(largest, 16, 32)
    assert block.config == largest and block.in_channels == MAX_WIDTH


def test_blocks_keep_their_width() -> None:
    choices = BlockChoices.build("gated_attention", FIELDS)
    with pytest.raises(ValueError, match="in_channels must equal out_channels"):
        ElasticGatedAttention(BlockContext("image", 16, 32), choices)
    with pytest.raises(ValueError, match="stride"):
        GatedAttention(choices.largest(), BlockContext("image", 16, 16, stride=2))


def test_causal_attention_ignores_later_tokens() -> None:
    block = make_block("sequence", causal=True).eval()
    for config, width in samples(block, 3, seed=11):
        block.set_active(config, width, width)
        static = block.extract().eval()
        x = torch.randn(2, 9, width)
        for t in (0, 4, 7):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn_like(changed[:, t + 1 :])
            with torch.no_grad():
                for module in (block, static):
                    before, after = module(x), module(changed)
                    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
                    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_non_causal_attention_sees_every_token() -> None:
    block = make_block("sequence", causal=False).eval()
    x = torch.randn(1, 6, MAX_WIDTH)
    changed = x.clone()
    changed[:, -1] = torch.randn(MAX_WIDTH)
    with torch.no_grad():
        assert not torch.allclose(block(changed)[:, 0], block(x)[:, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_head_wise_gate_scales_each_head_by_its_sigmoid(causal: bool) -> None:
    torch.manual_seed(1)
    config = GatedAttentionConfig(num_heads=4, head_dim=8, ffn="mlp", mlp_ratio=1, activation="gelu")
    mixer = GatedSelfAttention(config, BlockContext("sequence", 16, 16, causal=causal))
    gate_bias = torch.tensor([-2.0, 0.0, 1.5, 100.0])
    with torch.no_grad():
        mixer.gate.weight.zero_()
        mixer.gate.bias.copy_(gate_bias)
    x = torch.randn(2, 5, 16)

    def heads(layer: torch.nn.Linear) -> torch.Tensor:
        return layer(x).unflatten(-1, (4, 8)).transpose(1, 2)

    attention = F.scaled_dot_product_attention(heads(mixer.query), heads(mixer.key), heads(mixer.value), is_causal=causal)
    gated = attention * torch.sigmoid(gate_bias).view(1, 4, 1, 1)
    expected = mixer.output(gated.transpose(1, 2).flatten(2))
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), expected, atol=1e-5, rtol=0)
    assert torch.sigmoid(gate_bias[-1]) == 1.0


@pytest.mark.parametrize(("modality", "causal"), [("image", False), ("sequence", False), ("sequence", True)])
def test_onnx_export_matches_onnxruntime(modality: str, causal: bool) -> None:
    block = make_block(modality, causal).eval()
    for config, width in samples(block, 2, seed=3):
        block.set_active(config, width, width)
        static = block.extract().eval()
        shape = (width, 5, 3) if modality == "image" else (7, width)
        batch = torch.randn(3, *shape)
        with torch.no_grad():
            expected = static(batch).numpy()
        actual = onnx_outputs(static, torch.randn(2, *shape), batch)
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("modality", ["image", "sequence"])
def test_gradients_reach_every_parameter_of_the_largest_choice(modality: str) -> None:
    block = make_block(modality, causal=modality == "sequence").train()
    x = torch.randn(2, MAX_WIDTH, 3, 3) if modality == "image" else torch.randn(2, 5, MAX_WIDTH)
    block(x).square().sum().backward()
    for name, parameter in block.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name
