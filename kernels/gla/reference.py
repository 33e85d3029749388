"""Gated linear attention in plain PyTorch: the definition, the CPU path and the ONNX export path.

Gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient
Training") keeps, per batch element and head, a state ``S: [K, V]`` that decays along the key dimension:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        (S_0 = initial_state, or zeros)
    o_t = scale * q_t S_t                            (scale defaults to K ** -0.5)

where ``g_t <= 0`` is the log of the forget gate. Shapes used throughout this module:

    q, k, g: [B, H, L, K]    v: [B, H, L, V]    o: [B, H, L, V]    state: [B, H, K, V]

``recurrent_gla`` is the step-by-step definition (slow, for tests). ``chunk_gla`` is the chunkwise form used
for CPU inference and ONNX export: it only uses matmul, elementwise ops, ``cumsum`` over the fixed chunk
length, static slicing and concatenation, so ``torch.onnx.export`` (opset 17+) traces it at a fixed sequence
length with a dynamic batch axis.

Half-precision inputs are computed in float32; the output has the dtype of ``q`` and the final state the
compute dtype (float32 for float16/bfloat16 inputs, otherwise the dtype of ``q``).
"""

from __future__ import annotations

import torch

__all__ = ["chunk_gla", "recurrent_gla"]


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    """Raise ``ValueError`` on inconsistent shapes; skipped while tracing, where sizes are traced values."""
    if torch.jit.is_tracing():
        return
    for name, tensor in (("q", q), ("k", k), ("v", v), ("g", g)):
        if tensor.dim() != 4:
            raise ValueError(f"gated linear attention: {name} must have 4 dimensions [B, H, L, D], got shape {tuple(tensor.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"gated linear attention: k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"gated linear attention: g must have the shape of q {tuple(q.shape)}, got {tuple(g.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gated linear attention: v must share [B, H, L] with q {tuple(q.shape[:3])}, got {tuple(v.shape[:3])}")
    if initial_state is not None:
        expected = (q.shape[0], q.shape[1], q.shape[3], v.shape[3])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"gated linear attention: initial_state must have shape [B, H, K, V] = {expected}, got {tuple(initial_state.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, one time step at a time (the definition; O(L) Python steps).

    Args:
        q: queries ``[B, H, L, K]``.
        k: keys ``[B, H, L, K]``.
        v: values ``[B, H, L, V]``.
        g: log forget gate ``[B, H, L, K]``, ``g <= 0``.
        scale: multiplies ``q S``; ``K ** -0.5`` when ``None``.
        initial_state: ``S_0`` ``[B, H, K, V]``; zeros when ``None``.
        output_final_state: also return ``S_L``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, H, L, V]`` in the dtype of ``q``; ``final_state`` ``[B, H, K, V]``
        or ``None`` when ``output_final_state`` is false.
    """
    _check_inputs(q, k, v, g, initial_state)
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    if scale is None:
        scale = key_dim**-0.5
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v, g = q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype)
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(length):
        state = state * g[:, :, t].exp().unsqueeze(-1) + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outputs.append((q[:, :, t].unsqueeze(-1) * state).sum(-2) * scale)
    if outputs:
        o = torch.stack(outputs, dim=2)
    else:
        o = v.new_zeros(batch, heads, 0, value_dim)
    return o.to(out_dtype), (state if output_final_state else None)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention in chunks of ``chunk_size`` steps (equal to ``recurrent_gla``).

    Within a chunk of length ``C`` the cumulative log decay ``b = cumsum(g)`` (``[B, H, C, K]``, ``b <= 0``)
    gives, for positions ``j <= i`` of the chunk,

        A[i, j]  = sum_d q[i, d] k[j, d] exp(b[i, d] - b[j, d])           intra-chunk scores  [B, H, C, C]
        o[i]     = scale * ((q[i] * exp(b[i])) S + sum_{j <= i} A[i, j] v[j])
        S       <- exp(b[C-1])^T * S + sum_j (k[j] * exp(b[C-1] - b[j]))^T v[j]

    Every exponent is ``<= 0``: the pairwise differences ``b[i] - b[j]`` are materialised as
    ``[B, H, C, C, K]`` and the positions ``j > i`` are masked to ``-inf`` before ``exp``, so strong decay
    (``g`` of -30 and below) underflows to 0 instead of overflowing. A sequence length that is not a multiple
    of ``chunk_size`` ends in a shorter chunk.

    Args:
        q: queries ``[B, H, L, K]``.
        k: keys ``[B, H, L, K]``.
        v: values ``[B, H, L, V]``.
        g: log forget gate ``[B, H, L, K]``, ``g <= 0``.
        scale: multiplies ``q S``; ``K ** -0.5`` when ``None``.
        chunk_size: steps per chunk, a positive integer; memory grows with ``chunk_size ** 2 * K``.
        initial_state: ``S_0`` ``[B, H, K, V]``; zeros when ``None``.
        output_final_state: also return ``S_L``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, H, L, V]`` in the dtype of ``q``; ``final_state`` ``[B, H, K, V]``
        or ``None`` when ``output_final_state`` is false.
    """
    _check_inputs(q, k, v, g, initial_state)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"gated linear attention: chunk_size must be a positive integer, got {chunk_size!r}")
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    if scale is None:
        scale = key_dim**-0.5
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v, g = q.to(dtype), k.to(dtype), v.to(dtype), g.to(dtype)
    state = None if initial_state is None else initial_state.to(dtype)
    if not torch.jit.is_tracing() and length == 0:
        if state is None:
            state = q.new_zeros(batch, heads, key_dim, value_dim)
        return v.new_zeros(batch, heads, 0, value_dim).to(out_dtype), (state if output_final_state else None)

    outputs = []
    for q_chunk, k_chunk, v_chunk, g_chunk in zip(
        q.split(chunk_size, dim=2), k.split(chunk_size, dim=2), v.split(chunk_size, dim=2), g.split(chunk_size, dim=2), strict=True
    ):
        size = q_chunk.shape[2]
        decay = g_chunk.cumsum(dim=2)
        decay_last = decay[:, :, -1:]

        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril().unsqueeze(-1)
        pairwise = (decay.unsqueeze(3) - decay.unsqueeze(2)).masked_fill(~causal, float("-inf")).exp()
        scores = (q_chunk.unsqueeze(3) * k_chunk.unsqueeze(2) * pairwise).sum(-1)
        o_chunk = scores @ v_chunk
        if state is not None:
            o_chunk = o_chunk + (q_chunk * decay.exp()) @ state
        outputs.append(o_chunk * scale)

        contribution = (k_chunk * (decay_last - decay).exp()).transpose(-1, -2) @ v_chunk
        if state is None:
            state = contribution
        else:
            state = state * decay_last.transpose(-1, -2).exp() + contribution

    o = torch.cat(outputs, dim=2)
    return o.to(out_dtype), (state if output_final_state else None)
