"""Every built-in space: 50 random subnets each, supernet == extracted == ONNX Runtime, parameter counts agree."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nas.export.onnx import matches_within_rounding
from nas.space.schema import builtin_spaces, load_config
from nas.supernets.costs import arch_cost, example_input
from nas.supernets.elastic import count_parameters
from nas.supernets.space import ArchError
from nas.supernets.supernet import Supernet
from tests.helpers import randomise_batch_norm

ARCHS_PER_SPACE = 50
FEWER_ARCHS = {"ofa_mbv3_w12": 10}
"""Twins of another built-in space run the same code at other widths: fewer subnets."""


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
    while len(archs) < min(FEWER_ARCHS.get(name, ARCHS_PER_SPACE), space.count()):
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
        ok, distance, noise = matches_within_rounding(static, batch, onnx_logits(static, x, batch), 1e-4)
        assert ok, (arch.short_name(), np.abs(onnx_logits(static, x, batch) - expected).max(), distance, noise)
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


def make_divisible(value: float, divisor: int = 8) -> int:
    """Once-for-All's ``make_divisible`` (from the TensorFlow MobileNet code), written out again here on purpose."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def ofa_mbv3_counts(width_mult: float, depth: int, kernel: int, expand: int, resolution: int) -> tuple[int, int]:
    """(parameters, MACs) of Once-for-All's MobileNetV3 at ``width_mult`` with every elastic stage at ``depth`` blocks
    of ``kernel`` and ``expand``, counted by hand from OFA's construction (``OFAMobileNetV3``): stem 3x3 s2 + BN,
    a fixed first block (k3, e1), five stages (strides 2, 2, 2, 1, 2; SE in stages 2, 4, 5 with
    ``make_divisible(mid // 4, 8)`` and biased convs), final 1x1 expand + BN, a 1x1 feature mix without bias or BN,
    and a biased classifier. MACs: convolutions and linear layers, batch 1."""
    base = [16, 16, 24, 40, 80, 112, 160, 960, 1280]
    widths = [make_divisible(width * width_mult) for width in base]
    strides, squeeze = [2, 2, 2, 1, 2], [False, True, False, True, True]
    size = (resolution - 1) // 2 + 1
    params, macs = 27 * widths[0] + 2 * widths[0], size * size * 27 * widths[0]
    channels = widths[0]

    def block(in_channels: int, out_channels: int, k: int, e: int, stride: int, se: bool, size: int) -> tuple[int, int, int]:
        mid = make_divisible(round(in_channels * e)) if e != 1 else in_channels
        out_size = (size - 1) // stride + 1
        p = m = 0
        if e != 1:
            p, m = in_channels * mid + 2 * mid, size * size * in_channels * mid
        p, m = p + mid * k * k + 2 * mid, m + out_size * out_size * mid * k * k
        if se:
            reduced = make_divisible(mid // 4)
            p, m = p + 2 * mid * reduced + reduced + mid, m + 2 * mid * reduced
        return p + mid * out_channels + 2 * out_channels, m + out_size * out_size * mid * out_channels, out_size

    p, m, size = block(channels, widths[1], 3, 1, 1, False, size)
    params, macs, channels = params + p, macs + m, widths[1]
    for stage in range(5):
        for index in range(depth):
            p, m, size = block(channels, widths[stage + 2], kernel, expand, strides[stage] if index == 0 else 1, squeeze[stage], size)
            params, macs, channels = params + p, macs + m, widths[stage + 2]
    params += channels * widths[7] + 2 * widths[7] + widths[7] * widths[8] + widths[8] * 1000 + 1000
    macs += size * size * channels * widths[7] + widths[7] * widths[8] + widths[8] * 1000
    return params, macs


@pytest.mark.parametrize(("name", "width_mult"), [("ofa_mbv3", 1.0), ("ofa_mbv3_w12", 1.2)])
def test_ofa_mbv3_extremes_match_once_for_all_counted_by_hand(name: str, width_mult: float) -> None:
    space = load_config(name).space
    assert space.resolutions == tuple(range(128, 225, 4)) and len(space.resolutions) == 25
    assert space.count() == 25 * 7371**5
    assert arch_cost(space, space.largest()) == ofa_mbv3_counts(width_mult, 4, 7, 6, 224)
    assert arch_cost(space, space.smallest()) == ofa_mbv3_counts(width_mult, 2, 3, 3, 128)
