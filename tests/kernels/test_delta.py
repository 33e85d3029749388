"""The gated delta rule with Householder products: chunkwise (WY) form == recurrent definition, ONNX export."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.kernels.delta import chunk_delta_rule, delta_rule, recurrent_delta_rule

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")

BATCH, HEADS, KEY_DIM, VALUE_DIM = 2, 2, 5, 3
NAMES = ("q", "k", "v", "beta", "g")


def make_inputs(
    length: int,
    steps: int = 1,
    *,
    gate: str = "scalar",
    beta_range: float = 1.0,
    batch: int = BATCH,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """q: [B, H, L, K], k: [B, H, L, n_h, K] (unit norm), v: [B, H, L, n_h, V], beta: [B, H, L, n_h] in
    (0, beta_range), g: [B, H, L] (scalar), [B, H, L, K] (channel), strongly negative (strong) or None (none)."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    prefix = (batch, HEADS, length)
    gates = {
        "none": None,
        "scalar": F.logsigmoid(normal(*prefix) + 2.0),
        "channel": F.logsigmoid(normal(*prefix, KEY_DIM) + 2.0),
        "strong": -30.0 - 5.0 * torch.rand(*prefix, KEY_DIM, generator=generator, dtype=torch.float64),
    }
    tensors = {
        "q": normal(*prefix, KEY_DIM),
        "k": F.normalize(normal(*prefix, steps, KEY_DIM), dim=-1),
        "v": normal(*prefix, steps, VALUE_DIM),
        "beta": beta_range * torch.rand(*prefix, steps, generator=generator, dtype=torch.float64),
        "g": gates[gate],
        "initial_state": normal(batch, HEADS, KEY_DIM, VALUE_DIM),
    }
    return {name: None if tensor is None else tensor.to(dtype) for name, tensor in tensors.items()}


def run(function, inputs: dict, use_initial_state: bool = True, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return function(
        inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["g"],
        initial_state=inputs["initial_state"] if use_initial_state else None, output_final_state=True, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(("length", "chunk_size"), [(1, 8), (7, 8), (17, 8), (33, 8), (33, 16)])
@pytest.mark.parametrize("gate", ["scalar", "channel", "none"])
@pytest.mark.parametrize("beta_range", [1.0, 2.0], ids=["positive", "negative_eigenvalues"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_chunk_equals_recurrent(steps: int, beta_range: float, gate: str, length: int, chunk_size: int) -> None:
    inputs = make_inputs(length, steps, gate=gate, beta_range=beta_range, seed=length + steps)
    for use_initial_state in (False, True):
        expected_o, expected_state = run(recurrent_delta_rule, inputs, use_initial_state)
        o, state = run(chunk_delta_rule, inputs, use_initial_state, chunk_size=chunk_size)
        assert o.shape == (BATCH, HEADS, length, VALUE_DIM) and state.shape == (BATCH, HEADS, KEY_DIM, VALUE_DIM)
        torch.testing.assert_close(o, expected_o, atol=1e-5, rtol=0)
        torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("steps", "gate", "length"), [(1, "scalar", 9), (2, "channel", 7), (3, "scalar", 5), (2, "none", 6)])
def test_chunk_gradients_equal_recurrent_gradients(steps: int, gate: str, length: int) -> None:
    inputs = make_inputs(length, steps, gate=gate, beta_range=2.0, seed=3)
    names = [name for name in (*NAMES, "initial_state") if inputs[name] is not None]
    generator = torch.Generator().manual_seed(1)
    o_cotangent = torch.randn(BATCH, HEADS, length, VALUE_DIM, generator=generator, dtype=torch.float64)
    state_cotangent = torch.randn(BATCH, HEADS, KEY_DIM, VALUE_DIM, generator=generator, dtype=torch.float64)

    def gradients(function, **kwargs) -> list[torch.Tensor]:
        leaves = {name: tensor.clone().requires_grad_() if name in names else tensor for name, tensor in inputs.items()}
        o, state = run(function, leaves, **kwargs)
        loss = (o * o_cotangent).sum() + (state * state_cotangent).sum()
        return list(torch.autograd.grad(loss, [leaves[name] for name in names]))

    expected = gradients(recurrent_delta_rule)
    actual = gradients(chunk_delta_rule, chunk_size=4)
    for name, gradient, reference in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(gradient, reference, atol=1e-8, rtol=0, msg=f"d{name}")


def test_chunk_passes_gradcheck() -> None:
    inputs = make_inputs(5, 2, gate="channel", batch=1)
    leaves = tuple(inputs[name].clone().requires_grad_() for name in ("q", "k", "v", "beta", "g", "initial_state"))

    def function(q, k, v, beta, g, initial_state):
        return chunk_delta_rule(q, k, v, beta, g, chunk_size=2, initial_state=initial_state, output_final_state=True)

    assert torch.autograd.gradcheck(function, leaves)


def test_householder_steps_are_pseudo_tokens() -> None:
    """DeltaProduct: n_h steps per token equal n_h single-step tokens with the gate on the first, read after the last."""
    steps, length = 3, 6
    inputs = make_inputs(length, steps, gate="channel", beta_range=2.0)
    expected, expected_state = run(recurrent_delta_rule, inputs)
    gate = F.pad(inputs["g"].unsqueeze(3), (0, 0, 0, steps - 1)).flatten(2, 3)
    query = inputs["q"].repeat_interleave(steps, dim=2)
    o, state = recurrent_delta_rule(
        query, inputs["k"].flatten(2, 3), inputs["v"].flatten(2, 3), inputs["beta"].flatten(2, 3), gate,
        initial_state=inputs["initial_state"], output_final_state=True,
    )  # fmt: skip
    torch.testing.assert_close(o[:, :, steps - 1 :: steps], expected)
    torch.testing.assert_close(state, expected_state)


def test_recurrence_follows_the_papers() -> None:
    """One token by hand: S' = (I - b2 k2 k2^T)(I - b1 k1 k1^T) diag(a) S + ..., o = K^-1/2 S'^T q."""
    inputs = make_inputs(1, 2, gate="channel", beta_range=2.0, batch=1)
    state = inputs["initial_state"][0, 0]
    alpha = inputs["g"][0, 0, 0].exp()
    state = torch.diag(alpha) @ state
    for j in range(2):
        key, value, step = inputs["k"][0, 0, 0, j], inputs["v"][0, 0, 0, j], inputs["beta"][0, 0, 0, j]
        state = (torch.eye(KEY_DIM, dtype=torch.float64) - step * torch.outer(key, key)) @ state + step * torch.outer(key, value)
    o, final_state = run(chunk_delta_rule, inputs)
    torch.testing.assert_close(final_state[0, 0], state)
    torch.testing.assert_close(o[0, 0, 0], state.T @ inputs["q"][0, 0, 0] * KEY_DIM**-0.5)


def test_unit_step_writes_the_value_exactly() -> None:
    """With beta = 1 and a unit key the delta rule overwrites the memory at that key: S^T k = v after the step."""
    inputs = make_inputs(4, 1, gate="none")
    inputs["beta"] = torch.ones_like(inputs["beta"])
    _, state = run(chunk_delta_rule, inputs)
    read = (inputs["k"][:, :, -1, 0].unsqueeze(-1) * state).sum(-2)
    torch.testing.assert_close(read, inputs["v"][:, :, -1, 0])


def test_four_dimensional_inputs_mean_one_step() -> None:
    inputs = make_inputs(10, 1)
    squeezed = dict(inputs, k=inputs["k"][:, :, :, 0], v=inputs["v"][:, :, :, 0], beta=inputs["beta"][..., 0])
    for function in (recurrent_delta_rule, chunk_delta_rule):
        for expected, actual in zip(run(function, inputs), run(function, squeezed), strict=True):
            torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_chunk_is_stable_under_strong_decay(dtype: torch.dtype) -> None:
    inputs = make_inputs(33, 2, gate="strong", beta_range=2.0)
    expected_o, expected_state = run(recurrent_delta_rule, inputs)
    cast = {name: None if tensor is None else tensor.to(dtype) for name, tensor in inputs.items()}
    o, state = run(chunk_delta_rule, cast, chunk_size=16)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(o.double(), expected_o, atol=tolerance, rtol=0)
    torch.testing.assert_close(state.double(), expected_state, atol=tolerance, rtol=0)


def test_half_precision_computes_in_float32_and_final_state_is_optional() -> None:
    inputs = make_inputs(20, 2, gate="channel", dtype=torch.bfloat16)
    o, state = run(chunk_delta_rule, inputs)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    expected, _ = run(recurrent_delta_rule, {name: tensor.float() for name, tensor in inputs.items()})
    torch.testing.assert_close(o.float(), expected, atol=5e-2, rtol=5e-2)
    _, no_state = chunk_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["g"])
    assert no_state is None


def test_empty_sequence_keeps_the_initial_state() -> None:
    inputs = make_inputs(0, 2)
    o, state = run(chunk_delta_rule, inputs)
    assert o.shape == (BATCH, HEADS, 0, VALUE_DIM)
    torch.testing.assert_close(state, inputs["initial_state"])


def test_invalid_inputs_raise_value_errors() -> None:
    inputs = make_inputs(5, 2)
    q, k, v, beta, g = (inputs[name] for name in NAMES)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_delta_rule(q, k, v, beta, g, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        chunk_delta_rule(q, k, v, beta[..., :1], g)
    with pytest.raises(ValueError, match="v must"):
        chunk_delta_rule(q, k, v[:, :, :4], beta, g)
    with pytest.raises(ValueError, match="g must"):
        chunk_delta_rule(q, k, v, beta, torch.zeros(BATCH, HEADS, 5, KEY_DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="initial_state"):
        chunk_delta_rule(q, k, v, beta, g, initial_state=torch.zeros(1, HEADS, KEY_DIM, VALUE_DIM, dtype=torch.float64))


def test_dispatcher_runs_the_chunkwise_reference(caplog: pytest.LogCaptureFixture) -> None:
    inputs = make_inputs(9, 2, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="nas.kernels.delta"):
        actual = delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["g"], chunk_size=4)
    expected = chunk_delta_rule(inputs["q"], inputs["k"], inputs["v"], inputs["beta"], inputs["g"], chunk_size=4)
    torch.testing.assert_close(actual[0], expected[0])
    assert not caplog.records


class _DeltaRule(torch.nn.Module):
    def __init__(self, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, q, k, v, beta, g, initial_state):
        return delta_rule(q, k, v, beta, g, chunk_size=self.chunk_size, initial_state=initial_state, output_final_state=True)


@pytest.mark.parametrize(("steps", "gate"), [(1, "scalar"), (2, "channel")])
def test_onnx_export_matches_onnxruntime(steps: int, gate: str) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    names = [*NAMES, "initial_state"]
    module = _DeltaRule(chunk_size=4).eval()
    example = make_inputs(11, steps, gate=gate, beta_range=2.0, dtype=torch.float32)
    buffer = io.BytesIO()
    torch.onnx.export(
        module, tuple(example[name] for name in names), buffer, dynamo=False, opset_version=17,
        input_names=names, output_names=["o", "final_state"],
        dynamic_axes={name: {0: "batch"} for name in [*names, "o", "final_state"]},
    )  # fmt: skip
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    batch = make_inputs(11, steps, gate=gate, beta_range=2.0, batch=3, dtype=torch.float32, seed=7)
    actual = session.run(None, {name: batch[name].numpy() for name in names})
    with torch.no_grad():
        expected = module(*(batch[name] for name in names))
    for onnx_output, torch_output in zip(actual, expected, strict=True):
        assert onnx_output.shape == tuple(torch_output.shape)
        np.testing.assert_allclose(onnx_output, torch_output.numpy(), atol=1e-4, rtol=0)
