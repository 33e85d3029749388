"""MBConv: elastic == extracted == ONNX Runtime, parameter counts, no shared storage, kernel transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from nas.supernets.blocks import BlockChoices, BlockContext
from nas.supernets.blocks.mbconv import ElasticMBConv, MBConv, MBConvConfig
from nas.supernets.elastic import ElasticBatchNorm2d, centred_kernel, count_parameters
from nas.supernets.layers import hidden_channels

CHOICES = {
    "kernel_size": (3, 5, 7),
    "expand_ratio": (1, 3, 4, 6),
    "activation": ("relu", "hard_swish", "silu"),
    "squeeze_excite": (False, True),
}

CONTEXTS = [(16, 16, 1), (16, 24, 2), (24, 16, 1), (12, 12, 2)]


def build(in_channels: int, out_channels: int, stride: int, choices: dict | None = None) -> ElasticMBConv:
    block_choices = BlockChoices.build("mbconv", choices or CHOICES)
    return block_choices.entry.elastic_class(BlockContext("image", in_channels, out_channels, stride), block_choices)


def randomize(block: nn.Module, generator: torch.Generator) -> None:
    """Random weights, biases, BN affine parameters and running statistics; kernel transforms away from identity."""
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "transforms" in name:
                parameter.add_(0.1 * noise)
            elif parameter.dim() == 1:
                parameter.copy_(0.5 * noise)
            else:
                parameter.copy_(noise * (2.0 / parameter[0].numel()) ** 0.5)
        for module in block.modules():
            if isinstance(module, ElasticBatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)


def storages(module: nn.Module) -> set[int]:
    tensors = [*module.parameters(), *module.buffers()]
    return {tensor.untyped_storage().data_ptr() for tensor in tensors if tensor.numel()}


def cases() -> list[tuple[tuple[int, int, int], MBConvConfig, int, int]]:
    rng = np.random.default_rng(0)
    result = []
    for in_channels, out_channels, stride in CONTEXTS:
        for index in range(4):
            config = MBConvConfig(
                kernel_size=int(rng.choice(CHOICES["kernel_size"])),
                expand_ratio=int(rng.choice(CHOICES["expand_ratio"])),
                activation=str(rng.choice(CHOICES["activation"])),
                squeeze_excite=bool(index % 2),
            )
            active_in, active_out = in_channels, out_channels
            if index > 0:
                active_in = int(rng.integers(1, in_channels + 1))
                active_out = int(rng.integers(1, out_channels + 1))
            if index == 1:
                active_out = min(active_in, out_channels)
            result.append(((in_channels, out_channels, stride), config, active_in, active_out))
    return result


@pytest.mark.parametrize(("context", "config", "active_in", "active_out"), cases())
def test_elastic_equals_extracted(context: tuple[int, int, int], config: MBConvConfig, active_in: int, active_out: int) -> None:
    generator = torch.Generator().manual_seed(1)
    block = build(*context)
    randomize(block, generator)
    block.set_active(config, active_in, active_out)
    block.eval()
    static = block.extract().eval()

    x = torch.randn(3, active_in, 14, 14, generator=generator)
    with torch.no_grad():
        expected = block(x)
        actual = static(x)
    assert actual.shape == (3, active_out, 14 // context[2], 14 // context[2])
    assert (expected - actual).abs().max().item() <= 1e-5

    fresh = MBConv(config, BlockContext("image", active_in, active_out, context[2]))
    assert count_parameters(static) == count_parameters(fresh)
    assert {key: value.shape for key, value in static.state_dict().items()} == {key: value.shape for key, value in fresh.state_dict().items()}
    assert static.use_residual == (context[2] == 1 and active_in == active_out)

    assert storages(static).isdisjoint(storages(block))
    assert all(tensor.is_contiguous() for tensor in static.state_dict().values())
    with torch.no_grad():
        for tensor in [*block.parameters(), *block.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(1.0)
        assert torch.equal(static(x), actual)


def test_largest_choice_is_active_by_default() -> None:
    block = build(16, 24, 2)
    assert block.config == MBConvConfig(kernel_size=7, expand_ratio=6, activation="relu", squeeze_excite=True)
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 24, 4, 4)
    assert block.max_hidden == 96


def test_expand_ratio_one_skips_expansion_and_slices_depthwise() -> None:
    block = build(16, 16, 1)
    config = MBConvConfig(kernel_size=5, expand_ratio=1, activation="silu", squeeze_excite=False)
    block.set_active(config, 16, 16)
    static = block.extract()
    assert static.expand is None
    assert static.depthwise[0].weight.shape == (16, 1, 5, 5)
    expected = block.depthwise_conv.active_weight(16, 16, 5)
    assert torch.equal(static.depthwise[0].weight, expected.detach())


def test_only_needed_weights_exist() -> None:
    choices = {**CHOICES, "expand_ratio": (1,), "squeeze_excite": (False,)}
    block = build(8, 8, 1, choices)
    assert block.expand_conv is None and block.expand_norm is None
    assert block.se_reduce is None and block.se_expand is None
    block.eval()
    static = block.extract().eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert (block(x) - static(x)).abs().max().item() <= 1e-5


def test_set_active_rejects_values_outside_choices() -> None:
    block = build(16, 16, 1)
    with pytest.raises(ValueError, match=r"kernel_size must be one of \[3, 5, 7\], got 9"):
        block.set_active(MBConvConfig(9, 6, "relu", False), 16, 16)
    with pytest.raises(ValueError, match="activation"):
        block.set_active(MBConvConfig(3, 6, "relu6", False), 16, 16)
    with pytest.raises(ValueError, match="in_channels"):
        block.set_active(MBConvConfig(3, 6, "relu", False), 17, 16)
    assert block.config.kernel_size == 7


def test_static_rejects_invalid_config() -> None:
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        MBConv(MBConvConfig(4, 6, "relu", False), BlockContext("image", 8, 8, 1))


def test_kernel_transform_starts_as_centre_crop_and_learns() -> None:
    block = build(8, 8, 1)
    conv = block.depthwise_conv
    hidden = block.max_hidden
    assert torch.equal(conv.active_weight(hidden, hidden, 3), centred_kernel(conv.weight, 3))
    assert torch.equal(conv.active_weight(hidden, hidden, 5), centred_kernel(conv.weight, 5))
    assert set(conv.transforms) == {"7to5", "5to3"}

    block.set_active(MBConvConfig(3, 6, "hard_swish", True), 8, 8)
    block.train()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    before = {name: matrix.detach().clone() for name, matrix in conv.transforms.items()}
    loss = block(torch.randn(4, 8, 10, 10)).square().mean()
    loss.backward()
    for name, matrix in conv.transforms.items():
        assert matrix.grad is not None and matrix.grad.abs().sum().item() > 0, name
    optimizer.step()
    for name, matrix in conv.transforms.items():
        assert not torch.equal(matrix.detach(), before[name]), name


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.parametrize("squeeze_excite", [False, True])
def test_onnx_export_matches_onnxruntime(squeeze_excite: bool) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    block = build(16, 16, 1)
    randomize(block, torch.Generator().manual_seed(2))
    block.set_active(MBConvConfig(5, 4, "hard_swish", squeeze_excite), 16, 16)
    static = block.extract().eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        static,
        (torch.randn(1, 16, 12, 12),),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 16, 12, 12)
    (actual,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = static(x).numpy()
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-4


def inverted_residual_parameters(in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int = 3) -> int:
    """torchvision MobileNetV2 ``InvertedResidual``: bias-free convs, each followed by BN (2 parameters/channel)."""
    hidden = round(in_channels * expand_ratio)
    expand = in_channels * hidden + 2 * hidden if expand_ratio != 1 else 0
    depthwise = kernel_size * kernel_size * hidden + 2 * hidden
    project = hidden * out_channels + 2 * out_channels
    return expand + depthwise + project


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "stride", "expand_ratio", "expected"),
    [
        (32, 16, 1, 1, 896),  # torchvision mobilenet_v2 features[1]
        (16, 24, 2, 6, 5136),  # features[2]
        (24, 24, 1, 6, 8832),  # features[3]
        (64, 96, 1, 6, 66624),  # features[11]
        (160, 320, 1, 6, 473920),  # features[17]
    ],
)
def test_parameter_count_matches_mobilenet_v2(in_channels: int, out_channels: int, stride: int, expand_ratio: int, expected: int) -> None:
    assert inverted_residual_parameters(in_channels, out_channels, expand_ratio) == expected
    config = MBConvConfig(kernel_size=3, expand_ratio=expand_ratio, activation="relu6", squeeze_excite=False)
    block = MBConv(config, BlockContext("image", in_channels, out_channels, stride))
    assert count_parameters(block) == expected
    assert block.use_residual == (stride == 1 and in_channels == out_channels)
    assert hidden_channels(in_channels, expand_ratio) == in_channels * expand_ratio


def test_squeeze_excite_width_follows_mobilenet_v3() -> None:
    config = MBConvConfig(kernel_size=5, expand_ratio=3, activation="hard_swish", squeeze_excite=True)
    block = MBConv(config, BlockContext("image", 24, 40, 2))
    assert block.squeeze_excite.reduce.out_channels == 24  # make_divisible(72 // 4, 8)
    assert isinstance(block.squeeze_excite.gate, nn.Hardsigmoid)
