"""Every built-in space: 50 random subnets each, supernet == extracted == ONNX Runtime, parameter counts agree."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nas.export.onnx import float32_rounding_error
from nas.space.schema import builtin_spaces, load_config
from nas.supernets.costs import arch_cost, example_input
from nas.supernets.elastic import count_parameters
from nas.supernets.space import ArchError
from nas.supernets.supernet import Supernet
from tests.helpers import randomise_batch_norm

ARCHS_PER_SPACE = 50


def random_input(space, size: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    if space.modality == "image":
        return torch.randn(batch, space.in_channels, size, size, generator=generator)
    return torch.randint(0, space.in_channels, (batch, size), generator=generator)


def onnx_logits(module: torch.nn.Module, example: torch.Tensor, batch: torch.Tensor) -> np.ndarray:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": batch.numpy()})[0]


@pytest.mark.parametrize("name", sorted(builtin_spaces()))
def test_random_subnets_of_builtin_space_agree_everywhere(name: str) -> None:
    space = load_config(name).space
    torch.manual_seed(0)
    supernet = Supernet(space)
    randomise_batch_norm(supernet)
    supernet.eval()
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    archs = {space.largest(), space.smallest()}
    while len(archs) < min(ARCHS_PER_SPACE, space.count()):
        archs.add(space.sample(rng))
    for arch in sorted(archs, key=lambda a: a.to_json()):
        size = arch.resolution or arch.sequence_length
        x = random_input(space, size, 2, generator)
        supernet.set_active(arch)
        static = supernet.extract().eval()
        with torch.no_grad():
            elastic_logits = supernet(x)
            static_logits = static(x)
        assert (elastic_logits - static_logits).abs().max().item() <= 1e-5, arch.short_name()
        batch = random_input(space, size, 3, generator)
        with torch.no_grad():
            expected = static(batch).numpy()
        error = np.abs(onnx_logits(static, x, batch) - expected).max()
        assert error <= max(1e-4, 2 * float32_rounding_error(static, batch)), arch.short_name()
        params, _ = arch_cost(space, arch)
        assert count_parameters(static) == params
        assert static_logits.shape[0] == 2


def test_extracted_subnet_shares_no_storage_and_survives_supernet_updates() -> None:
    space = load_config("digits_quick").space
    supernet = Supernet(space).eval()
    arch = space.sample(np.random.default_rng(1))
    static = supernet.extract(arch).eval()
    x = example_input(space, arch.resolution, 2).normal_()
    before = static(x)
    shared = {tensor.data_ptr() for tensor in supernet.state_dict().values()}
    assert not any(tensor.data_ptr() in shared for tensor in static.state_dict().values())
    with torch.no_grad():
        for parameter in supernet.parameters():
            parameter.add_(1.0)
    assert torch.equal(static(x), before)


def test_set_active_rejects_archs_outside_the_space_without_clamping() -> None:
    space = load_config("digits_quick").space
    supernet = Supernet(space)
    good = space.largest()
    bad_width = type(good)(tuple(type(s)(s.width + 1, s.blocks) for s in good.stages), good.resolution)
    with pytest.raises(ArchError, match=r"stages\[0\]\.width: must be one of"):
        supernet.set_active(bad_width)
    with pytest.raises(ArchError, match="resolution: must be one of"):
        supernet.set_active(type(good)(good.stages, 17))
    assert supernet.arch == good
