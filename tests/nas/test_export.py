"""ONNX export: checker, metadata round trip, ORT == PyTorch at another batch size, atomic writes, INT8 checks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nas
from nas.export.onnx import ExportError, export_onnx, export_subnet, quantizable_nodes, quantize_int8, read_metadata
from nas.supernets.blocks import BLOCKS, BlockChoices
from nas.supernets.space import Arch, HeadSpec, SearchSpace, StageArch, StageSpace, StemSpec
from nas.supernets.supernet import StaticNet, Supernet


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models run fastest that way on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def require_blocks(*names: str) -> None:
    """Every block a test uses is registered (a missing one is a failure, not a skip)."""
    missing = [name for name in names if name not in BLOCKS]
    assert not missing, f"block types not registered: {missing}"


FFN_CHOICES = {"ffn": ("glu", "mlp"), "mlp_ratio": (1, 2), "activation": ("gelu", "silu")}


def image_space() -> SearchSpace:
    require_blocks("mbconv")
    mbconv = BlockChoices.build(
        "mbconv",
        {
            "kernel_size": (3, 5),
            "expand_ratio": (1, 3),
            "activation": ("relu", "hard_swish"),
            "squeeze_excite": (False, True),
        },
    )
    return SearchSpace(
        name="tiny_image",
        modality="image",
        in_channels=1,
        num_classes=10,
        stem=StemSpec(channels=8, kernel_size=3, stride=1),
        stages=(
            StageSpace(depths=(1, 2), widths=(8, 16), stride=2, blocks=(mbconv,)),
            StageSpace(depths=(1, 2), widths=(16, 24), stride=2, blocks=(mbconv,)),
        ),
        head=HeadSpec(channels=(32,), features=24, dropout=0.1),
        resolutions=(12, 16),
    )


def sequence_space() -> tuple[SearchSpace, BlockChoices, BlockChoices]:
    require_blocks("gated_attention", "gla")
    attention = BlockChoices.build("gated_attention", {"num_heads": (1, 2), "head_dim": (4, 8), **FFN_CHOICES})
    linear = BlockChoices.build("gla", {"num_heads": (1, 2), "key_dim": (4, 8), "value_dim": (4, 8), **FFN_CHOICES})
    space = SearchSpace(
        name="tiny_sequence",
        modality="sequence",
        in_channels=32,
        num_classes=32,
        stem=StemSpec(channels=16),
        stages=(
            StageSpace(depths=(2,), widths=(16, 24), stride=1, blocks=(attention, linear)),
            StageSpace(depths=(2,), widths=(16, 24), stride=1, blocks=(linear, attention)),
        ),
        head=HeadSpec(),
        sequence_lengths=(16, 24),
        causal=True,
    )
    return space, attention, linear


def randomize_batch_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Random running statistics (positive variances), as after BN recalibration."""
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.2 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))


def image_subnet(seed: int) -> tuple[SearchSpace, Arch, StaticNet]:
    space = image_space()
    torch.manual_seed(seed)
    supernet = Supernet(space)
    randomize_batch_norms(supernet, torch.Generator().manual_seed(seed))
    arch = space.sample(np.random.default_rng(seed))
    return space, arch, supernet.extract(arch).eval()


def sequence_subnet(seed: int) -> tuple[SearchSpace, Arch, StaticNet]:
    """A random arch holding both gated attention and gated linear attention blocks."""
    space, attention, linear = sequence_space()
    torch.manual_seed(seed)
    supernet = Supernet(space)
    rng = np.random.default_rng(seed)
    arch = Arch(
        (
            StageArch(24, (attention.sample(rng), linear.sample(rng))),
            StageArch(16, (linear.sample(rng), attention.sample(rng))),
        ),
        sequence_length=24,
    )
    space.check(arch)
    return space, arch, supernet.extract(arch).eval()


def example_inputs(space: SearchSpace, arch: Arch, batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if space.modality == "image":
        return torch.randn(batch, space.in_channels, arch.resolution, arch.resolution, generator=generator)
    return torch.randint(0, space.in_channels, (batch, arch.sequence_length), generator=generator)


def ort_logits(path: Path, inputs: torch.Tensor) -> np.ndarray:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": inputs.numpy()})[0]


@pytest.mark.parametrize("modality", ["image", "sequence"])
def test_export_checks_and_round_trips_metadata(tmp_path: Path, modality: str) -> None:
    space, arch, model = image_subnet(3) if modality == "image" else sequence_subnet(3)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, example_inputs(space, arch, 2, 0), path, arch=arch, space_name=space.name)

    assert result.path == path and 0.0 <= result.max_abs_error <= 1e-4
    assert sorted(tmp_path.iterdir()) == [path]
    onnx.checker.check_model(str(path), full_check=True)
    metadata = read_metadata(path)
    assert Arch.from_json(metadata["nasforge_arch"]) == arch
    assert metadata["nasforge_space"] == space.name
    assert metadata["nasforge_version"] == nas.__version__
    shape = [space.in_channels, arch.resolution, arch.resolution] if modality == "image" else [arch.sequence_length]
    assert json.loads(metadata["nasforge_input_shape"]) == ["batch", *shape]

    graph = onnx.load(str(path)).graph
    assert [value.name for value in graph.input] == ["input"]
    assert [value.name for value in graph.output] == ["logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    inputs = example_inputs(space, arch, 5, 1)
    with torch.no_grad():
        expected = model(inputs).numpy()
    np.testing.assert_allclose(ort_logits(path, inputs), expected, atol=1e-4, rtol=0)


def test_failed_tolerance_leaves_no_file(tmp_path: Path) -> None:
    space, arch, model = image_subnet(4)
    example = example_inputs(space, arch, 2, 0)
    with pytest.raises(ExportError, match="above the tolerance"):
        export_onnx(model, example, tmp_path / "model.onnx", arch=arch, space_name=space.name, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"previous export")
    with pytest.raises(ExportError):
        export_onnx(model, example, existing, arch=arch, space_name=space.name, tolerance=-1.0)
    assert existing.read_bytes() == b"previous export"
    assert list(tmp_path.iterdir()) == [existing]


def test_wrong_input_shape_is_rejected(tmp_path: Path) -> None:
    space, arch, model = image_subnet(5)
    wrong = torch.randn(2, 1, arch.resolution + 1, arch.resolution + 1)
    with pytest.raises(ExportError, match=f"float32 tensor \\[B, C, {arch.resolution}, {arch.resolution}\\]"):
        export_onnx(model, wrong, tmp_path / "model.onnx", arch=arch, space_name=space.name)
    assert list(tmp_path.iterdir()) == []


def digits(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits as normalised float [N, 1, R, R] images and int64 [N] labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def train_briefly(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> None:
    """SGD on image classification: images [N, C, R, R], labels [N]."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def train_previous_token(model: nn.Module, vocab_size: int, length: int, steps: int, seed: int) -> None:
    """Adam on "predict the previous token" (tokens [B, L] -> targets [B, L], position 0 unscored), so that the
    logits are no longer near-uniform and top-1 agreement means something."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (32, length), generator=generator)
        targets = torch.full_like(tokens, -100)
        targets[:, 1:] = tokens[:, :-1]
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if tensor in node.input]


def test_int8_digits_keeps_predictions_and_wraps_convs(tmp_path: Path) -> None:
    space = image_space()
    torch.manual_seed(0)
    supernet = Supernet(space)
    arch = dataclasses.replace(space.sample(np.random.default_rng(7)), resolution=16)
    model = supernet.extract(arch)
    images, labels = digits(arch.resolution)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    train_briefly(model, images[train], labels[train], steps=150, seed=0)
    with torch.no_grad():
        accuracy = (model(images[val]).argmax(-1) == labels[val]).float().mean().item()
    assert accuracy > 0.8, f"the tiny digits model did not learn (val accuracy {accuracy:.3f})"

    result = export_subnet(model, arch, space.name, tmp_path / "out", calibration=images[train][:256], validation=images[val], int8=True)

    assert result.path == tmp_path / "out" / "model.onnx"
    assert result.int8_path == tmp_path / "out" / "model.int8.onnx"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert result.max_abs_error <= 1e-4
    assert result.int8_top1_agreement is not None and result.int8_top1_agreement >= 0.9
    assert result.int8_max_abs_error is not None and result.int8_max_abs_error > 0.0
    onnx.checker.check_model(str(result.int8_path), full_check=True)
    metadata = read_metadata(result.int8_path)
    assert Arch.from_json(metadata["nasforge_arch"]) == arch
    quantization = json.loads(metadata["nasforge_quantization"])
    assert quantization["format"] == "QDQ" and quantization["per_channel"] is True

    graph = onnx.load(str(result.int8_path)).graph
    made_by = producers(graph)
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs
    for conv in convs:
        assert all(made_by[name].op_type == "DequantizeLinear" for name in conv.input[:2]), conv.name
        assert [node.op_type for node in consumers(graph, conv.output[0])] == ["QuantizeLinear"], conv.name
    gemms = [node for node in graph.node if node.op_type == "Gemm"]
    assert gemms and all(made_by[node.input[1]].op_type == "DequantizeLinear" for node in gemms)


def test_int8_leaves_attention_matmuls_in_float(tmp_path: Path) -> None:
    space, arch, model = sequence_subnet(11)
    train_previous_token(model, space.in_channels, arch.sequence_length, steps=100, seed=11)
    fp32 = export_onnx(model, example_inputs(space, arch, 2, 0), tmp_path / "model.onnx", arch=arch, space_name=space.name).path
    fp32_model = onnx.load(str(fp32))
    to_quantize, to_exclude = quantizable_nodes(fp32_model)
    by_name = {node.name: node for node in fp32_model.graph.node}
    # Weight ops only: the projections (MatMul) and the sequence stem's causal short convolution (Conv).
    assert {by_name[name].op_type for name in to_quantize} == {"MatMul", "Conv"}
    assert [by_name[name] for name in to_quantize if by_name[name].op_type == "Conv"][0].input[1] in {tensor.name for tensor in fp32_model.graph.initializer}
    assert {"MatMul", "Softmax", "LayerNormalization", "Sigmoid"} <= {by_name[name].op_type for name in to_exclude}

    result = quantize_int8(
        fp32,
        tmp_path / "model.int8.onnx",
        calibration=example_inputs(space, arch, 96, 1),
        validation=example_inputs(space, arch, 64, 2),
    )
    assert result.int8_top1_agreement is not None and result.int8_top1_agreement >= 0.9

    graph = onnx.load(str(result.int8_path)).graph
    made_by = producers(graph)
    initializers = {tensor.name for tensor in graph.initializer}

    def from_dequantize(tensor: str) -> bool:
        return tensor in made_by and made_by[tensor].op_type == "DequantizeLinear"

    def weight_input(tensor: str) -> bool:
        return from_dequantize(tensor) and made_by[tensor].input[0] in initializers

    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    projections = [node for node in matmuls if weight_input(node.input[1])]
    activation_products = [node for node in matmuls if not weight_input(node.input[1])]
    # Two gated attention blocks (scores and weighted values each) plus the chunked GLA matmuls.
    assert len(activation_products) >= 4 and projections
    for node in activation_products:
        assert not any(from_dequantize(name) for name in node.input), f"{node.name} reads a dequantized tensor"
    for node in projections:
        assert from_dequantize(node.input[0]), node.name
    # Softmax, LayerNorm and Sigmoid compute in float on float inputs (a LayerNorm output may still be quantized
    # as the input of the projections that follow it).
    for node in graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "Sigmoid"):
            assert not any(from_dequantize(name) for name in node.input), node.name


def test_int8_below_min_agreement_leaves_no_file(tmp_path: Path) -> None:
    space, arch, model = image_subnet(6)
    example = example_inputs(space, arch, 2, 0)
    fp32 = export_onnx(model, example, tmp_path / "model.onnx", arch=arch, space_name=space.name).path
    with pytest.raises(ExportError, match="top-1 agreement"):
        quantize_int8(
            fp32,
            tmp_path / "model.int8.onnx",
            calibration=example_inputs(space, arch, 32, 1),
            validation=example_inputs(space, arch, 16, 2),
            min_agreement=1.01,
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]
