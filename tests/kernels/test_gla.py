"""Gated linear attention: chunkwise reference == recurrent definition, ONNX export, dispatch, Triton kernels.

The Triton interpreter tests (``test_interpreted_*``) need ``TRITON_INTERPRET=1`` before triton is imported
(triton.language's own ``@jit`` helpers such as ``tl.sum`` are fixed at import), so the default run starts
them in a subprocess with the variable set; ``TRITON_INTERPRET=1 pytest tests/kernels`` runs them in-process.
The variable never leaks into this process, where GPU tests need compiled kernels.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from nas.kernels import _dispatch
from nas.kernels.gla import chunk_gla, gated_linear_attention, recurrent_gla, supports

BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 2, 5, 3


def make_inputs(
    length: int,
    *,
    key_dim: int = KEY_DIM,
    value_dim: int = VALUE_DIM,
    batch: int = BATCH,
    heads: int = HEADS,
    dtype: torch.dtype = torch.float64,
    gate: str = "random",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """q, k, g: [B, H, L, K], v: [B, H, L, V], initial_state: [B, H, K, V]."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    qk_shape = (batch, heads, length, key_dim)
    if gate == "random":
        g = torch.nn.functional.logsigmoid(normal(*qk_shape) + 2.0)
    elif gate == "strong":
        g = -30.0 - 5.0 * torch.rand(*qk_shape, generator=generator, dtype=torch.float64)
    elif gate == "weak":
        g = -1e-6 * torch.rand(*qk_shape, generator=generator, dtype=torch.float64)
    elif gate == "mixed":
        strong = torch.rand(*qk_shape, generator=generator, dtype=torch.float64) < 0.5
        g = torch.where(strong, -40.0, 0.0).to(torch.float64)
    else:
        raise ValueError(f"unknown gate {gate!r}")
    tensors = {
        "q": normal(*qk_shape),
        "k": normal(*qk_shape),
        "v": normal(batch, heads, length, value_dim),
        "g": g,
        "initial_state": normal(batch, heads, key_dim, value_dim),
    }
    return {name: tensor.to(dtype) for name, tensor in tensors.items()}


def outputs_and_gradients(
    function, inputs: dict[str, torch.Tensor], use_initial_state: bool, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``function``, backpropagate fixed random cotangents of o and the final state, return everything."""
    names = ["q", "k", "v", "g"] + (["initial_state"] if use_initial_state else [])
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in names}
    o, final_state = function(
        leaves["q"], leaves["k"], leaves["v"], leaves["g"],
        initial_state=leaves.get("initial_state"), output_final_state=True, **kwargs,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    o_cotangent = torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype)
    state_cotangent = torch.randn(final_state.shape, generator=generator, dtype=torch.float64).to(final_state.dtype)
    loss = (o * o_cotangent).sum() + (final_state * state_cotangent).sum()
    gradients = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), final_state.detach(), dict(zip(names, gradients, strict=False))


def assert_all_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, label: str) -> None:
    assert torch.isfinite(actual).all(), f"{label} has non-finite values"
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tolerance, atol=tolerance, msg=label)


@pytest.mark.parametrize("use_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("chunk_size", [16, 4])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_chunk_equals_recurrent_forward_and_gradients(length: int, chunk_size: int, use_initial_state: bool) -> None:
    inputs = make_inputs(length)
    expected = outputs_and_gradients(recurrent_gla, inputs, use_initial_state)
    actual = outputs_and_gradients(chunk_gla, inputs, use_initial_state, chunk_size=chunk_size)
    assert actual[0].shape == (BATCH, HEADS, length, VALUE_DIM)
    assert actual[1].shape == (BATCH, HEADS, KEY_DIM, VALUE_DIM)
    assert_all_close(actual[0], expected[0], 1e-10, "o")
    assert_all_close(actual[1], expected[1], 1e-10, "final_state")
    for name, gradient in expected[2].items():
        assert_all_close(actual[2][name], gradient, 1e-10, f"d{name}")


@pytest.mark.parametrize("gate", ["strong", "weak", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_chunk_is_stable_under_strong_and_weak_decay(gate: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(33, gate=gate)
    expected = outputs_and_gradients(recurrent_gla, inputs, True)
    actual = outputs_and_gradients(chunk_gla, {name: tensor.to(dtype) for name, tensor in inputs.items()}, True, chunk_size=16)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert_all_close(actual[0], expected[0], tolerance, "o")
    assert_all_close(actual[1], expected[1], tolerance, "final_state")
    for name, gradient in expected[2].items():
        assert_all_close(actual[2][name], gradient, tolerance * 10, f"d{name}")


def test_chunk_passes_gradcheck() -> None:
    inputs = make_inputs(6, key_dim=3, value_dim=2, batch=1, heads=1)
    leaves = tuple(inputs[name].clone().requires_grad_() for name in ("q", "k", "v", "g", "initial_state"))

    def function(q, k, v, g, initial_state):
        return chunk_gla(q, k, v, g, chunk_size=4, initial_state=initial_state, output_final_state=True)

    assert torch.autograd.gradcheck(function, leaves)


def test_final_state_only_when_requested_and_scale_is_applied() -> None:
    inputs = make_inputs(9)
    o, final_state = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert final_state is None
    o_scaled, _ = chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], scale=1.0)
    torch.testing.assert_close(o_scaled * KEY_DIM**-0.5, o)


def test_half_precision_inputs_compute_in_float32() -> None:
    inputs = make_inputs(20, dtype=torch.bfloat16)
    o, final_state = chunk_gla(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=inputs["initial_state"],
        output_final_state=True,
    )  # fmt: skip
    assert o.dtype == torch.bfloat16 and final_state.dtype == torch.float32
    expected, _ = recurrent_gla(*(inputs[name].float() for name in ("q", "k", "v", "g")), initial_state=inputs["initial_state"].float())
    torch.testing.assert_close(o.float(), expected, rtol=2e-2, atol=2e-2)


def test_empty_sequence() -> None:
    inputs = make_inputs(0)
    o, final_state = chunk_gla(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=inputs["initial_state"],
        output_final_state=True,
    )  # fmt: skip
    assert o.shape == (BATCH, HEADS, 0, VALUE_DIM)
    torch.testing.assert_close(final_state, inputs["initial_state"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": torch.zeros(BATCH, HEADS, 7, KEY_DIM + 1)}, "k must have the shape of q"),
        ({"g": torch.zeros(BATCH, HEADS, 6, KEY_DIM)}, "g must have the shape of q"),
        ({"v": torch.zeros(BATCH, HEADS, 8, VALUE_DIM)}, "v must share"),
        ({"q": torch.zeros(HEADS, 7, KEY_DIM)}, "q must have 4 dimensions"),
        ({"initial_state": torch.zeros(BATCH, HEADS, VALUE_DIM, KEY_DIM)}, "initial_state must have shape"),
    ],
)
def test_inconsistent_shapes_are_rejected(change: dict[str, torch.Tensor], message: str) -> None:
    inputs = make_inputs(7, dtype=torch.float32) | change
    for function in (chunk_gla, recurrent_gla):
        with pytest.raises(ValueError, match=message):
            function(inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=inputs["initial_state"])


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True])
def test_bad_chunk_size_is_rejected(chunk_size) -> None:
    inputs = make_inputs(7, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["g"], chunk_size=chunk_size)


class _GatedLinearAttentionModule(torch.nn.Module):
    """q, k, g: [B, H, L, K], v: [B, H, L, V], initial_state: [B, H, K, V] -> o, final_state."""

    def __init__(self, through_dispatcher: bool) -> None:
        super().__init__()
        self.through_dispatcher = through_dispatcher

    def forward(self, q, k, v, g, initial_state):
        if self.through_dispatcher:
            return gated_linear_attention(q, k, v, g, chunk_size=16, initial_state=initial_state, output_final_state=True)
        return chunk_gla(q, k, v, g, chunk_size=8, initial_state=initial_state, output_final_state=True)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.parametrize("through_dispatcher", [False, True], ids=["chunk_gla", "gated_linear_attention"])
def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path: Path, through_dispatcher: bool, caplog: pytest.LogCaptureFixture) -> None:
    """TorchScript exporter (dynamo=False): the dynamo exporter also works but takes ~10 s for this graph."""
    onnxruntime = pytest.importorskip("onnxruntime")
    names = ["q", "k", "v", "g", "initial_state"]
    module = _GatedLinearAttentionModule(through_dispatcher).eval()
    export_inputs = make_inputs(21, dtype=torch.float32, batch=2)
    path = tmp_path / "gla.onnx"
    _dispatch.reset_fallback_log()
    with caplog.at_level(logging.INFO, logger="nas.kernels"):
        torch.onnx.export(
            module, tuple(export_inputs[name] for name in names), str(path), dynamo=False, opset_version=17,
            input_names=names, output_names=["o", "final_state"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "o", "final_state"]},
        )  # fmt: skip
    assert not [record for record in caplog.records if record.name.startswith("nas.kernels")]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    run_inputs = make_inputs(21, dtype=torch.float32, batch=3, seed=7)
    onnx_outputs = session.run(None, {name: run_inputs[name].numpy() for name in names})
    with torch.no_grad():
        torch_outputs = module(*(run_inputs[name] for name in names))
    for onnx_output, torch_output in zip(onnx_outputs, torch_outputs, strict=False):
        assert onnx_output.shape == tuple(torch_output.shape)
        np.testing.assert_allclose(onnx_output, torch_output.numpy(), rtol=1e-4, atol=1e-4)


def test_dispatcher_on_cpu_falls_back_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    inputs = make_inputs(7, dtype=torch.float32)
    ok, reason = supports(inputs["q"], inputs["k"], inputs["v"], inputs["g"])
    assert not ok and "CUDA" in reason
    _dispatch.reset_fallback_log()
    with caplog.at_level(logging.INFO, logger="nas.kernels.gla"):
        results = [
            gated_linear_attention(
                inputs["q"],
                inputs["k"],
                inputs["v"],
                inputs["g"],
                initial_state=inputs["initial_state"],
                output_final_state=True,
            )  # fmt: skip
            for _ in range(3)
        ]
    records = [record for record in caplog.records if record.name == "nas.kernels.gla"]
    assert len(records) == 1, [record.getMessage() for record in records]
    assert reason in records[0].getMessage()
    expected_o, expected_state = chunk_gla(
        inputs["q"], inputs["k"], inputs["v"], inputs["g"], initial_state=inputs["initial_state"],
        output_final_state=True,
    )  # fmt: skip
    for o, final_state in results:
        torch.testing.assert_close(o, expected_o)
        torch.testing.assert_close(final_state, expected_state)


TRITON_AVAILABLE, TRITON_REASON = _dispatch.triton_status()


def _triton_runs_interpreted() -> bool:
    """True when triton was imported with ``TRITON_INTERPRET=1``, so every ``@triton.jit`` function (ours and
    triton.language's own, such as ``tl.sum``) runs in the interpreter."""
    if not TRITON_AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.cumsum, InterpretedFunction)


TRITON_INTERPRETED = _triton_runs_interpreted()
requires_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason=f"Triton tests need triton: {TRITON_REASON}")
requires_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRETED,
    reason=(
        "runs in the TRITON_INTERPRET=1 subprocess of test_triton_kernels_in_interpreter_subprocess "
        "(the variable must be set before triton is imported); set it before starting pytest to run this here"
        if TRITON_AVAILABLE
        else f"Triton tests need triton: {TRITON_REASON}"
    ),
)


@requires_triton
@pytest.mark.skipif(TRITON_INTERPRETED, reason="this process already runs the interpreter tests itself")
def test_triton_kernels_in_interpreter_subprocess() -> None:
    """Runs this file's ``test_interpreted_*`` tests in a fresh Python with ``TRITON_INTERPRET=1``."""
    environment = os.environ | {"TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "test_interpreted_"]
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    report = completed.stdout + completed.stderr
    assert completed.returncode == 0, report
    assert "skipped" not in report and " passed" in report, report


@pytest.fixture(scope="module")
def interpreted_triton() -> ModuleType:
    """``nas.kernels.gla.triton`` with its kernels in the Triton interpreter (CPU tensors)."""
    from nas.kernels.gla import triton as module

    return module


@pytest.fixture
def nan_buffers(interpreted_triton: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the Triton wrapper allocates starts as NaN, so any element a kernel skips shows up."""

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(interpreted_triton, "_new_buffer", poisoned)


@pytest.fixture
def no_overflow() -> None:
    """The interpreter evaluates with numpy: make any overflowing ``exp`` or ``inf * 0`` in a kernel an error."""
    with np.errstate(over="raise", invalid="raise"):
        yield


@requires_interpreter
@pytest.mark.parametrize(
    ("length", "key_dim", "value_dim", "chunk_size", "use_initial_state", "gate"),
    [
        (1, 5, 3, 16, True, "random"),
        (33, 5, 3, 16, True, "random"),
        (33, 5, 3, 16, False, "strong"),
        (33, 5, 3, 16, True, "mixed"),
        (20, 40, 70, 32, True, "mixed"),
        (70, 7, 17, 32, False, "weak"),
    ],
)
def test_interpreted_triton_matches_reference(
    interpreted_triton: ModuleType,
    nan_buffers: None,
    no_overflow: None,
    length: int,
    key_dim: int,
    value_dim: int,
    chunk_size: int,
    use_initial_state: bool,
    gate: str,
) -> None:
    inputs = make_inputs(length, key_dim=key_dim, value_dim=value_dim, batch=1, gate=gate)
    expected = outputs_and_gradients(chunk_gla, inputs, use_initial_state, chunk_size=chunk_size)
    actual = outputs_and_gradients(
        interpreted_triton.chunk_gla_triton,
        {name: tensor.float() for name, tensor in inputs.items()},
        use_initial_state,
        chunk_size=chunk_size,
    )
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.float32
    assert_all_close(actual[0], expected[0], 1e-4, "o")
    assert_all_close(actual[1], expected[1], 1e-4, "final_state")
    for name, gradient in expected[2].items():
        assert_all_close(actual[2][name], gradient, 1e-4 * max(1.0, gradient.abs().max().item()), f"d{name}")


@requires_interpreter
def test_interpreted_triton_gradient_through_final_state_only(interpreted_triton: ModuleType, nan_buffers: None, no_overflow: None) -> None:
    inputs = make_inputs(19, batch=1)
    gradients = []
    for function, dtype in ((chunk_gla, torch.float64), (interpreted_triton.chunk_gla_triton, torch.float32)):
        names = ("q", "k", "v", "g", "initial_state")
        leaves = [inputs[name].detach().to(dtype).clone().requires_grad_() for name in names]
        _, final_state = function(*leaves[:4], initial_state=leaves[4], output_final_state=True)
        final_state.sum().backward()
        gradients.append([torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves])
    for name, expected, actual in zip(("q", "k", "v", "g", "initial_state"), *gradients, strict=False):
        assert_all_close(actual, expected, 1e-4, f"d{name}")
    assert gradients[1][0].abs().max() == 0.0


@pytest.mark.gpu
@requires_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(TRITON_INTERPRETED, reason="TRITON_INTERPRET=1 is set; the compiled kernels are not in use")
@pytest.mark.parametrize(("length", "key_dim", "value_dim", "chunk_size"), [(33, 5, 3, 16), (300, 64, 128, 32)])
def test_dispatcher_uses_triton_on_cuda(monkeypatch: pytest.MonkeyPatch, length: int, key_dim: int, value_dim: int, chunk_size: int) -> None:
    from nas.kernels.gla import triton as compiled_triton

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(compiled_triton, "_new_buffer", poisoned)
    inputs = make_inputs(length, key_dim=key_dim, value_dim=value_dim, gate="mixed")
    cuda_inputs = {name: tensor.float().cuda() for name, tensor in inputs.items()}
    assert supports(cuda_inputs["q"], cuda_inputs["k"], cuda_inputs["v"], cuda_inputs["g"], chunk_size=chunk_size) == (
        True,
        "",
    )
    expected = outputs_and_gradients(chunk_gla, inputs, True, chunk_size=chunk_size)

    def dispatched(q, k, v, g, **kwargs):
        return gated_linear_attention(q, k, v, g, **kwargs)

    actual = outputs_and_gradients(dispatched, cuda_inputs, True, chunk_size=chunk_size)
    assert_all_close(actual[0].cpu(), expected[0], 1e-3, "o")
    assert_all_close(actual[1].cpu(), expected[1], 1e-3, "final_state")
    for name, gradient in expected[2].items():
        assert_all_close(actual[2][name].cpu(), gradient, 1e-3 * max(1.0, gradient.abs().max().item()), f"d{name}")
