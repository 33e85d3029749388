"""Gated linear attention in Triton: chunkwise forward and backward.

Same function as ``reference.chunk_gla`` (see that module for the recurrence); shapes:

    q, k, g: [B, H, L, K]    v: [B, H, L, V]    o: [B, H, L, V]    state: [B, H, K, V]

Forward, per chunk of ``C`` steps (``C`` in {16, 32}; the last chunk is masked when ``C`` does not divide
``L``):

1. ``_chunk_local_cumsum_kernel``: ``b = cumsum(g)`` inside each chunk, float32 ``[B, H, L, K]``.
2. ``_chunk_state_forward_kernel``: one program per (K block, V block, batch*head) walks the chunks in order
   and stores the state entering every chunk, ``h: [B, H, NT, K, V]`` float32, and the final state.
3. ``_chunk_output_forward_kernel``: one program per (V block, chunk, batch*head) computes
   ``o = scale * ((q * exp(b)) h + A v)`` with the intra-chunk scores
   ``A[i, j] = sum_d q[i, d] k[j, d] exp(b[i, d] - b[j, d])`` (``j <= i``) built from a ``[C, C, BK]``
   pairwise decay masked to ``-inf`` before ``exp`` (above the diagonal and on the padded rows of a last,
   partial chunk): every exponent is ``<= 0``, so strong decay underflows instead of overflowing.

Backward (a real Triton backward, not a recomputation through the reference): the chunk states are
recomputed (2.), ``_chunk_state_backward_kernel`` walks the chunks in reverse for the state gradients (and the
gradient of ``initial_state``), ``_chunk_dv_kernel`` and ``_chunk_dqk_kernel`` give ``dv`` and ``dq``, ``dk``
per chunk, and ``dg`` follows from the identity ``dG_t = q_t dq_t - k_t dk_t`` for the global cumulative log
decay ``G`` (plus ``sum_v S_L * dS_L`` from the final state) by a reverse cumulative sum over ``L``.

Inputs are float16, bfloat16 or float32; state and accumulation are float32; matmul operands are cast to the
input dtype (float32 operands use IEEE precision, not TF32). The output has the dtype of ``q``, the final
state is float32. Kernels are plain ``@triton.jit`` functions, so ``TRITON_INTERPRET=1`` set before triton
is first imported runs them on CPU tensors (triton.language's own ``@jit`` helpers such as ``tl.sum`` are fixed
at that import).

Verified against the reference (forward and all gradients, odd sizes, NaN-filled buffers) in the Triton
interpreter; compiled for sm_90 without a GPU (no register spills at ``C = 16``). Speed on a GPU is not measured
yet: with ``C = 16`` the intra-chunk scores run on CUDA cores, not tensor cores (flash-linear-attention's
sub-chunk split of ``A`` into 16 x 16 tiles, with ``tl.dot`` for the off-diagonal tiles, is the next step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["chunk_gla_triton"]


@triton.jit
def _chunk_local_cumsum_kernel(g, g_cumsum, L, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_n * C + tl.arange(0, C)
    o_k = i_k * BK + tl.arange(0, BK)
    mask = (o_t[:, None] < L) & (o_k[None, :] < K)
    offsets = i_bh.to(tl.int64) * L * K + o_t[:, None] * K + o_k[None, :]
    b_g = tl.load(g + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_cumsum + offsets, tl.cumsum(b_g, axis=0), mask=mask)


@triton.jit
def _chunk_state_forward_kernel(
    k,
    v,
    g_cumsum,
    h,
    h0,
    ht,
    L,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh64 = i_bh.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    state_offsets = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_bh64 * K * V + state_offsets, mask=m_kv, other=0.0).to(tl.float32)

    for i_n in range(NT):
        tl.store(h + (i_bh64 * NT + i_n) * K * V + state_offsets, b_h, mask=m_kv)
        o_t = i_n * C + tl.arange(0, C)
        m_t = o_t < L
        last = tl.minimum(i_n * C + C, L) - 1
        b_k = tl.load(k + i_bh64 * L * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + i_bh64 * L * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_g = tl.load(g_cumsum + i_bh64 * L * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_g_last = tl.load(g_cumsum + i_bh64 * L * K + last * K + o_k, mask=m_k, other=0.0)
        b_k_decayed = tl.where(m_t[:, None], b_k.to(tl.float32) * tl.exp(b_g_last[None, :] - b_g), 0.0)
        b_h = b_h * tl.exp(b_g_last)[:, None] + tl.dot(tl.trans(b_k_decayed).to(b_v.dtype), b_v, input_precision="ieee")

    if STORE_FINAL_STATE:
        tl.store(ht + i_bh64 * K * V + state_offsets, b_h, mask=m_kv)


@triton.jit
def _chunk_output_forward_kernel(
    q,
    k,
    v,
    g_cumsum,
    h,
    o,
    scale,
    L,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, C)
    o_t = i_n * C + o_i
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]

    b_v = tl.load(v + i_bh64 * L * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_o = tl.zeros([C, BV], dtype=tl.float32)
    b_scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        tk_offsets = i_bh64 * L * K + o_t[:, None] * K + o_k[None, :]
        b_q = tl.load(q + tk_offsets, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + tk_offsets, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(g_cumsum + tk_offsets, mask=m_tk, other=0.0)
        b_h = tl.load(
            h + (i_bh64 * NT + i_n) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )
        b_q_decayed = (b_q * tl.exp(b_g)).to(b_v.dtype)
        b_o += tl.dot(b_q_decayed, b_h.to(b_v.dtype), input_precision="ieee")
        pairwise = tl.exp(tl.where(causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf")))
        b_scores += tl.sum(b_q[:, None, :] * b_k[None, :, :] * pairwise, axis=2)
    b_o += tl.dot(b_scores.to(b_v.dtype), b_v, input_precision="ieee")
    tl.store(
        o + i_bh64 * L * V + o_t[:, None] * V + o_v[None, :],
        (b_o * scale).to(o.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )


@triton.jit
def _chunk_state_backward_kernel(
    q,
    do,
    g_cumsum,
    dh,
    dht,
    dh0,
    scale,
    L,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
):
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh64 = i_bh.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    state_offsets = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_bh64 * K * V + state_offsets, mask=m_kv, other=0.0).to(tl.float32)

    for i_step in range(NT):
        i_n = NT - 1 - i_step
        tl.store(dh + (i_bh64 * NT + i_n) * K * V + state_offsets, b_dh, mask=m_kv)
        o_t = i_n * C + tl.arange(0, C)
        m_t = o_t < L
        last = tl.minimum(i_n * C + C, L) - 1
        b_q = tl.load(q + i_bh64 * L * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_do = tl.load(do + i_bh64 * L * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_g = tl.load(g_cumsum + i_bh64 * L * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_g_last = tl.load(g_cumsum + i_bh64 * L * K + last * K + o_k, mask=m_k, other=0.0)
        b_q_decayed = b_q.to(tl.float32) * tl.exp(b_g) * scale
        b_dh = b_dh * tl.exp(b_g_last)[:, None] + tl.dot(tl.trans(b_q_decayed).to(b_do.dtype), b_do, input_precision="ieee")

    if STORE_INITIAL_STATE_GRADIENT:
        tl.store(dh0 + i_bh64 * K * V + state_offsets, b_dh, mask=m_kv)


@triton.jit
def _chunk_dv_kernel(
    q,
    k,
    g_cumsum,
    do,
    dh,
    dv,
    scale,
    L,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, C)
    o_t = i_n * C + o_i
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    last = tl.minimum(i_n * C + C, L) - 1

    b_do = tl.load(do + i_bh64 * L * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    b_dv = tl.zeros([C, BV], dtype=tl.float32)
    b_scores = tl.zeros([C, C], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        tk_offsets = i_bh64 * L * K + o_t[:, None] * K + o_k[None, :]
        b_q = tl.load(q + tk_offsets, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + tk_offsets, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(g_cumsum + tk_offsets, mask=m_tk, other=0.0)
        b_g_last = tl.load(g_cumsum + i_bh64 * L * K + last * K + o_k, mask=m_k, other=0.0)
        b_dh = tl.load(
            dh + (i_bh64 * NT + i_n) * K * V + o_k[:, None] * V + o_v[None, :],
            mask=m_k[:, None] & m_v[None, :],
            other=0.0,
        )
        b_k_decayed = tl.where(m_t[:, None], b_k * tl.exp(b_g_last[None, :] - b_g), 0.0)
        b_dv += tl.dot(b_k_decayed.to(b_do.dtype), b_dh.to(b_do.dtype), input_precision="ieee")
        pairwise = tl.exp(tl.where(causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf")))
        b_scores += tl.sum(b_q[:, None, :] * b_k[None, :, :] * pairwise, axis=2)
    b_dv += tl.dot(tl.trans(b_scores * scale).to(b_do.dtype), b_do, input_precision="ieee")
    tl.store(
        dv + i_bh64 * L * V + o_t[:, None] * V + o_v[None, :],
        b_dv.to(dv.dtype.element_ty),
        mask=m_t[:, None] & m_v[None, :],
    )


@triton.jit
def _chunk_dqk_kernel(
    q,
    k,
    v,
    g_cumsum,
    h,
    do,
    dh,
    dq,
    dk,
    dg_local,
    scale,
    L,
    NT,
    K: tl.constexpr,
    V: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh64 = i_bh.to(tl.int64)
    o_i = tl.arange(0, C)
    o_t = i_n * C + o_i
    m_t = o_t < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    tk_offsets = i_bh64 * L * K + o_t[:, None] * K + o_k[None, :]
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    last = tl.minimum(i_n * C + C, L) - 1

    b_q = tl.load(q + tk_offsets, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + tk_offsets, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(g_cumsum + tk_offsets, mask=m_tk, other=0.0)
    b_g_last = tl.load(g_cumsum + i_bh64 * L * K + last * K + o_k, mask=m_k, other=0.0)

    b_dq = tl.zeros([C, BK], dtype=tl.float32)
    b_dk = tl.zeros([C, BK], dtype=tl.float32)
    b_dscores = tl.zeros([C, C], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        tv_offsets = i_bh64 * L * V + o_t[:, None] * V + o_v[None, :]
        kv_offsets = (i_bh64 * NT + i_n) * K * V + o_k[:, None] * V + o_v[None, :]
        b_v = tl.load(v + tv_offsets, mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_do = tl.load(do + tv_offsets, mask=m_t[:, None] & m_v[None, :], other=0.0).to(b_v.dtype)
        b_h = tl.load(h + kv_offsets, mask=m_k[:, None] & m_v[None, :], other=0.0).to(b_v.dtype)
        b_dh = tl.load(dh + kv_offsets, mask=m_k[:, None] & m_v[None, :], other=0.0).to(b_v.dtype)
        b_dscores += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision="ieee")
        b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision="ieee")

    b_dscores = tl.where(causal, b_dscores * scale, 0.0)
    b_dq = b_dq * tl.exp(b_g) * scale
    b_dk = tl.where(m_t[:, None], b_dk * tl.exp(b_g_last[None, :] - b_g), 0.0)
    pairwise = tl.exp(tl.where(causal[:, :, None], b_g[:, None, :] - b_g[None, :, :], float("-inf")))
    b_dq += tl.sum(b_dscores[:, :, None] * b_k[None, :, :] * pairwise, axis=1)
    b_dk += tl.sum(b_dscores[:, :, None] * b_q[:, None, :] * pairwise, axis=0)

    tl.store(dq + tk_offsets, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + tk_offsets, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dg_local + tk_offsets, b_q * b_dq - b_k * b_dk, mask=m_tk)


def _new_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer that a kernel writes in full (the tests swap in NaN-filled buffers to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block(dimension: int, largest: int) -> int:
    return min(largest, max(16, triton.next_power_of_2(dimension)))


def _intra_chunk_block_k(chunk_size: int) -> int:
    """Largest K block for the ``[C, C, BK]`` pairwise decay: 32 for C = 16, 16 for C = 32 (sm_90, 4 warps,
    no or few register spills by ``cuobjdump -res-usage``)."""
    return 32 if chunk_size <= 16 else 16


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(o [B, H, L, V], final_state [B, H, K, V] | None)``."""
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    chunks = triton.cdiv(length, chunk_size)
    g_cumsum = _local_cumsum(g, chunk_size)
    states, final_state = _chunk_states(k, v, g_cumsum, chunk_size, initial_state, output_final_state)
    o = _new_buffer(v.shape, q.dtype, q.device)
    block_k, block_v = _block(key_dim, _intra_chunk_block_k(chunk_size)), _block(value_dim, 64)
    grid = (triton.cdiv(value_dim, block_v), chunks, batch * heads)
    _chunk_output_forward_kernel[grid](
        q, k, v, g_cumsum, states, o, scale, length, chunks,
        K=key_dim, V=value_dim, C=chunk_size, BK=block_k, BV=block_v,
    )  # fmt: skip
    return o, final_state


def _local_cumsum(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    batch, heads, length, key_dim = g.shape
    g_cumsum = _new_buffer(g.shape, torch.float32, g.device)
    block_k = _block(key_dim, 64)
    grid = (triton.cdiv(key_dim, block_k), triton.cdiv(length, chunk_size), batch * heads)
    _chunk_local_cumsum_kernel[grid](g, g_cumsum, length, K=key_dim, C=chunk_size, BK=block_k)
    return g_cumsum


def _chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g_cumsum: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, heads, length, key_dim = k.shape
    value_dim = v.shape[-1]
    chunks = triton.cdiv(length, chunk_size)
    states = _new_buffer((batch, heads, chunks, key_dim, value_dim), torch.float32, k.device)
    final_state = _new_buffer((batch, heads, key_dim, value_dim), torch.float32, k.device) if output_final_state else None
    block_k, block_v = _block(key_dim, 64), _block(value_dim, 64)
    grid = (triton.cdiv(key_dim, block_k), triton.cdiv(value_dim, block_v), batch * heads)
    _chunk_state_forward_kernel[grid](
        k, v, g_cumsum, states, initial_state, final_state, length, chunks,
        K=key_dim, V=value_dim, C=chunk_size, BK=block_k, BV=block_v,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
    )  # fmt: skip
    return states, final_state


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    do: torch.Tensor,
    final_state_gradient: torch.Tensor | None,
    final_state: torch.Tensor | None,
    scale: float,
    chunk_size: int,
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``(dq, dk, dv, dg, d_initial_state | None)`` with the shapes of the inputs.

    ``final_state`` (from the forward) is needed only when ``final_state_gradient`` is given.
    """
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    chunks = triton.cdiv(length, chunk_size)
    g_cumsum = _local_cumsum(g, chunk_size)
    states, _ = _chunk_states(k, v, g_cumsum, chunk_size, initial_state, output_final_state=False)

    state_gradients = _new_buffer((batch, heads, chunks, key_dim, value_dim), torch.float32, q.device)
    initial_state_gradient = _new_buffer((batch, heads, key_dim, value_dim), torch.float32, q.device) if initial_state is not None else None
    block_k, block_v = _block(key_dim, 64), _block(value_dim, 64)
    grid = (triton.cdiv(key_dim, block_k), triton.cdiv(value_dim, block_v), batch * heads)
    _chunk_state_backward_kernel[grid](
        q, do, g_cumsum, state_gradients, final_state_gradient, initial_state_gradient, scale, length, chunks,
        K=key_dim, V=value_dim, C=chunk_size, BK=block_k, BV=block_v,
        USE_FINAL_STATE_GRADIENT=final_state_gradient is not None,
        STORE_INITIAL_STATE_GRADIENT=initial_state is not None,
    )  # fmt: skip

    dv = _new_buffer(v.shape, v.dtype, v.device)
    block_k, block_v = _block(key_dim, _intra_chunk_block_k(chunk_size)), _block(value_dim, 64)
    grid = (triton.cdiv(value_dim, block_v), chunks, batch * heads)
    _chunk_dv_kernel[grid](
        q, k, g_cumsum, do, state_gradients, dv, scale, length, chunks,
        K=key_dim, V=value_dim, C=chunk_size, BK=block_k, BV=block_v,
    )  # fmt: skip

    dq = _new_buffer(q.shape, q.dtype, q.device)
    dk = _new_buffer(k.shape, k.dtype, k.device)
    dg_local = _new_buffer(g.shape, torch.float32, g.device)
    block_k, block_v = _block(key_dim, _intra_chunk_block_k(chunk_size)), _block(value_dim, 64)
    grid = (triton.cdiv(key_dim, block_k), chunks, batch * heads)
    _chunk_dqk_kernel[grid](
        q, k, v, g_cumsum, states, do, state_gradients, dq, dk, dg_local, scale, length, chunks,
        K=key_dim, V=value_dim, C=chunk_size, BK=block_k, BV=block_v,
    )  # fmt: skip

    dg = dg_local.flip(2).cumsum(2).flip(2)
    if final_state_gradient is not None:
        assert final_state is not None, "a final-state gradient exists only when the forward returned the final state"
        dg = dg + (final_state * final_state_gradient).sum(-1).unsqueeze(2)
    if initial_state is not None and initial_state_gradient is not None:
        initial_state_gradient = initial_state_gradient.to(initial_state.dtype)
    return dq, dk, dv, dg.to(g.dtype), initial_state_gradient


class _ChunkGatedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, chunk_size, initial_state, output_final_state):
        o, final_state = _forward(q, k, v, g, scale, chunk_size, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, g, initial_state, final_state)
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)
        return o, final_state

    @staticmethod
    def backward(ctx, do, final_state_gradient):
        q, k, v, g, initial_state, final_state = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v, dtype=q.dtype)
        do = do.contiguous()
        if final_state_gradient is not None:
            final_state_gradient = final_state_gradient.contiguous()
        dq, dk, dv, dg, initial_state_gradient = _backward(q, k, v, g, do, final_state_gradient, final_state, ctx.scale, ctx.chunk_size, initial_state)
        return dq, dk, dv, dg, None, None, initial_state_gradient, None


def chunk_gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention with Triton kernels, differentiable in ``q, k, v, g, initial_state``.

    Args:
        q: queries ``[B, H, L, K]``; q, k, v, g share one dtype of float16, bfloat16, float32.
        k: keys ``[B, H, L, K]``.
        v: values ``[B, H, L, V]``.
        g: log forget gate ``[B, H, L, K]``, ``g <= 0``.
        scale: multiplies ``q S``; ``K ** -0.5`` when ``None``.
        chunk_size: 16 or 32 (``tl.dot`` needs at least 16 rows; the ``[C, C, BK]`` pairwise decay spills
            registers beyond 32).
        initial_state: ``S_0`` ``[B, H, K, V]`` (any float dtype; used as float32); zeros when ``None``.
        output_final_state: also return ``S_L`` (float32).

    Returns:
        ``(o [B, H, L, V] in the dtype of q, final_state [B, H, K, V] float32 | None)``.

    The caller (``nas.kernels.gla.gated_linear_attention``) checks the inputs with ``supports`` first.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    return _ChunkGatedLinearAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), float(scale), int(chunk_size),
        initial_state, bool(output_final_state),
    )  # fmt: skip
