"""The gated delta rule with Householder products in plain PyTorch: the definition, the CPU path and the export path.

One kernel covers the delta-rule family:

* DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"): no gate;
* Gated DeltaNet (Yang et al. 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule"): one decay per head;
* Kimi Delta Attention (Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture"): one decay
  per key channel;
* DeltaProduct (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via Householder
  Products"): ``n_h`` delta steps per token, each with its own key, value and ``beta``;
* negative eigenvalues (Grazzi et al. 2024, "Unlocking State-Tracking in Linear RNNs Through Negative
  Eigenvalues"): ``beta`` in ``(0, 2)`` instead of ``(0, 1)``; the kernel takes any ``beta``.

Per batch element and head the state ``S: [K, V]`` evolves, for token ``t`` and step ``j = 1..n_h``, as

    S <- diag(exp(g_t)) S                                         (j = 1 only: the gate acts once per token)
    S <- (I - beta_{t,j} k_{t,j} k_{t,j}^T) S + beta_{t,j} k_{t,j} v_{t,j}^T
    o_t = scale * S^T q_t                                         (after step n_h)

so token ``t``'s transition is ``prod_j (I - beta_{t,j} k_{t,j} k_{t,j}^T) diag(exp(g_t))``, diagonal plus rank
``n_h``. ``g_t <= 0`` is the log decay: a scalar per head (``g: [B, H, L]``), one value per key channel
(``g: [B, H, L, K]``) or none (``g = None``, plain DeltaNet). With unit-norm keys and ``beta`` in ``[0, 2]``
every Householder factor has eigenvalues in ``[-1, 1]``; the kernel does not normalise the keys itself.

Shapes used throughout this module (``n_h`` may be left out: 4-D ``k``, ``v`` and 3-D ``beta`` mean ``n_h = 1``):

    q: [B, H, L, K]    k: [B, H, L, n_h, K]    v: [B, H, L, n_h, V]    beta: [B, H, L, n_h]
    g: [B, H, L] or [B, H, L, K] or None       o: [B, H, L, V]         state: [B, H, K, V]

``recurrent_delta_rule`` is the step-by-step definition (slow, for tests). ``chunk_delta_rule`` is the chunkwise
(WY / UT) form used on CPU and for ONNX export: matmuls, elementwise ops, ``cumsum``, static slicing and
concatenation, and a forward substitution unrolled over the chunk (ONNX has no triangular solve), so
``torch.onnx.export`` (opset 17) traces it at a fixed sequence length with a dynamic batch axis.

Half-precision inputs are computed in float32; the output has the dtype of ``q`` and the final state the compute
dtype (float32 for float16/bfloat16 inputs, otherwise the dtype of ``q``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["chunk_delta_rule", "recurrent_delta_rule"]

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> Inputs:
    """Check shapes (skipped while tracing), add the ``n_h`` axis where it is left out and give ``g`` a trailing
    axis: returns ``q [B, H, L, K], k [B, H, L, n_h, K], v [B, H, L, n_h, V], beta [B, H, L, n_h]`` and
    ``g [B, H, L, 1 or K]`` (or ``None``)."""
    tracing = torch.jit.is_tracing()
    if k.dim() == 4:
        if not tracing and (v.dim() != 4 or beta.dim() != 3):
            raise ValueError(f"delta rule: with 4-D k (n_h = 1), v must be 4-D and beta 3-D, got v {tuple(v.shape)}, beta {tuple(beta.shape)}")
        k, v, beta = k.unsqueeze(3), v.unsqueeze(3), beta.unsqueeze(3)
    if g is not None and g.dim() == 3:
        g = g.unsqueeze(-1)
    if tracing:
        return q, k, v, beta, g
    if q.dim() != 4:
        raise ValueError(f"delta rule: q must have shape [B, H, L, K], got {tuple(q.shape)}")
    batch, heads, length, key_dim = q.shape
    if k.dim() != 5 or k.shape[:3] != q.shape[:3] or k.shape[4] != key_dim:
        raise ValueError(f"delta rule: k must have shape [B, H, L, n_h, K] with [B, H, L, K] = {tuple(q.shape)}, got {tuple(k.shape)}")
    steps = k.shape[3]
    if steps < 1:
        raise ValueError("delta rule: k must hold at least one Householder step (n_h >= 1)")
    if v.dim() != 5 or v.shape[:4] != k.shape[:4]:
        raise ValueError(f"delta rule: v must have shape [B, H, L, n_h, V] with [B, H, L, n_h] = {tuple(k.shape[:4])}, got {tuple(v.shape)}")
    if tuple(beta.shape) != tuple(k.shape[:4]):
        raise ValueError(f"delta rule: beta must have shape [B, H, L, n_h] = {tuple(k.shape[:4])}, got {tuple(beta.shape)}")
    if g is not None and (g.dim() != 4 or g.shape[:3] != q.shape[:3] or g.shape[3] not in (1, key_dim)):
        raise ValueError(f"delta rule: g must have shape [B, H, L] or [B, H, L, K] with [B, H, L, K] = {tuple(q.shape)}, got {tuple(g.shape)}")
    if initial_state is not None:
        expected = (batch, heads, key_dim, v.shape[4])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"delta rule: initial_state must have shape [B, H, K, V] = {expected}, got {tuple(initial_state.shape)}")
    return q, k, v, beta, g


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule with ``n_h`` Householder steps per token, one step at a time (the definition).

    Args:
        q: queries ``[B, H, L, K]``.
        k: keys ``[B, H, L, n_h, K]`` (or ``[B, H, L, K]`` for ``n_h = 1``), unit norm for a stable recurrence.
        v: values ``[B, H, L, n_h, V]`` (or ``[B, H, L, V]``).
        beta: step sizes ``[B, H, L, n_h]`` (or ``[B, H, L]``), in ``(0, 1)`` or ``(0, 2)``.
        g: log decay ``[B, H, L]`` (per head) or ``[B, H, L, K]`` (per key channel), ``<= 0``; ``None``: no decay.
        scale: multiplies ``S^T q``; ``K ** -0.5`` when ``None``.
        initial_state: ``S_0`` ``[B, H, K, V]``; zeros when ``None``.
        output_final_state: also return ``S_L``.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, H, L, V]`` in the dtype of ``q``; ``final_state`` ``[B, H, K, V]`` or
        ``None`` when ``output_final_state`` is false.
    """
    q, k, v, beta, g = _prepare(q, k, v, beta, g, initial_state)
    batch, heads, length, key_dim = q.shape
    steps, value_dim = k.shape[3], v.shape[4]
    if scale is None:
        scale = key_dim**-0.5
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(length):
        if g is not None:
            state = state * g[:, :, t].to(dtype).exp().unsqueeze(-1)
        for j in range(steps):
            key, value, step = k[:, :, t, j], v[:, :, t, j], beta[:, :, t, j, None, None]
            error = value - (key.unsqueeze(-1) * state).sum(-2)
            state = state + step * key.unsqueeze(-1) * error.unsqueeze(-2)
        outputs.append((q[:, :, t].unsqueeze(-1) * state).sum(-2) * scale)
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(batch, heads, 0, value_dim)
    return o.to(out_dtype), (state if output_final_state else None)


def _decayed_scores(left: torch.Tensor, left_decay: torch.Tensor, right: torch.Tensor, right_decay: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``out[r, s] = sum_d left[r, d] right[s, d] exp(left_decay[r, d] - right_decay[s, d])`` where ``mask[r, s]``,
    else 0. left: [..., R, K], right: [..., S, K], decays [..., R or S, 1 or K] (cumulative log gates), mask [R, S].

    A per-head decay (last axis 1) factors out of the sum, so the scores are one matmul; a per-channel decay
    materialises the pairwise differences ``[..., R, S, K]``. The masked exponents are set to ``-inf`` before ``exp``,
    so every exponent taken is ``<= 0`` and strong decay underflows to 0 instead of overflowing."""
    if left_decay.shape[-1] == 1:
        difference = left_decay - right_decay.transpose(-1, -2)
        return (left @ right.transpose(-1, -2)) * difference.masked_fill(~mask, float("-inf")).exp()
    difference = left_decay.unsqueeze(-2) - right_decay.unsqueeze(-3)
    pairwise = difference.masked_fill(~mask.unsqueeze(-1), float("-inf")).exp()
    return (left.unsqueeze(-2) * right.unsqueeze(-3) * pairwise).sum(-1)


def _row_substitution(lower: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Solve ``(I + lower) X = right`` for strictly lower-triangular ``lower: [..., C, C]``, ``right: [..., C, D]``
    row by row, ``X[r] = right[r] - lower[r, :r] X[:r]``: a Python loop over the fixed size ``C``."""
    rows = [right[..., :1, :]]
    for r in range(1, right.shape[-2]):
        rows.append(right[..., r : r + 1, :] - lower[..., r : r + 1, :r] @ torch.cat(rows, dim=-2))
    return torch.cat(rows, dim=-2)


def _forward_substitution(lower: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Solve ``(I + lower) X = right`` for strictly lower-triangular ``lower: [..., C, C]``, ``right: [..., C, D]``.

    Blocked forward substitution, unrolled over the fixed chunk length (ONNX has no triangular solve): the chunk is
    cut into ``n`` blocks of ``b ~ sqrt(C)`` rows (zero-padded); the inverses of all diagonal blocks ``I + L_ii`` come
    from one row-by-row substitution (``b`` steps, every block at once), then block row ``i`` is
    ``X_i = (I + L_ii)^-1 (right_i - L_i,<i X_<i)``. That is about ``b + 2 n`` sequential matmuls instead of ``C``.
    """
    size = int(right.shape[-2])
    block = max(1, math.isqrt(size - 1) + 1) if size > 1 else 1
    if block >= size:
        return _row_substitution(lower, right)
    blocks = math.ceil(size / block)
    padding = blocks * block - size
    lower = F.pad(lower, (0, padding, 0, padding))
    right = F.pad(right, (0, 0, 0, padding))
    diagonal = torch.stack([lower[..., i * block : (i + 1) * block, i * block : (i + 1) * block] for i in range(blocks)], dim=-3)
    identity = torch.eye(block, dtype=right.dtype, device=right.device).expand_as(diagonal)
    inverses = _row_substitution(diagonal, identity)
    solved = [inverses[..., 0, :, :] @ right[..., :block, :]]
    for i in range(1, blocks):
        rows = slice(i * block, (i + 1) * block)
        known = torch.cat(solved, dim=-2)
        solved.append(inverses[..., i, :, :] @ (right[..., rows, :] - lower[..., rows, : i * block] @ known))
    return torch.cat(solved, dim=-2)[..., :size, :]


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule in chunks of ``chunk_size`` tokens (equal to ``recurrent_delta_rule``).

    The ``n_h`` steps of a token are laid out as ``n_h`` consecutive steps with the token's gate on the first and
    the output read after the last (as DeltaProduct does), so a chunk of ``C`` tokens holds ``C * n_h`` steps
    ``i`` with keys ``k_i``, values ``v_i``, ``beta_i`` and cumulative log decay ``b_i`` (``[1 or K]``, counted from
    the chunk start, ``b <= 0``). With ``S_0`` the state at the chunk start the state after step ``r`` is

        S_r = diag(exp(b_r)) (S_0 + sum_{i <= r} (k_i * exp(-b_i)) u_i^T)

    (the WY / UT representation), where the pseudo-values ``u`` solve the lower-triangular system

        u_r + sum_{i < r} A[r, i] u_i = beta_r (v_r - S_0^T (k_r * exp(b_r))),
        A[r, i] = beta_r sum_d k_r[d] k_i[d] exp(b_r[d] - b_i[d])                    (i < r)

    Splitting the right-hand side gives ``u = U - W S_0`` with ``(I + A) W = beta * k * exp(b)`` and
    ``(I + A) U = beta * v``, solved by forward substitution unrolled over the chunk and independent of ``S_0``, so
    every chunk is solved at once; only the state is carried from chunk to chunk:

        o_t   = scale * ((q_t * exp(b_{s_t})) S_0 + sum_{i <= s_t} (q_t . (k_i * exp(b_{s_t} - b_i))) u_i)
        S_end = diag(exp(b_end)) S_0 + sum_i (k_i * exp(b_end - b_i)) u_i^T

    where ``s_t`` is token ``t``'s last step. Every exponent is ``<= 0``. A sequence length that is not a multiple
    of the chunk size is padded with identity steps (``k = v = beta = g = 0``) whose outputs are dropped; a
    sequence shorter than ``chunk_size`` is one chunk of its own length.

    Args:
        q, k, v, beta, g, scale, initial_state, output_final_state: as in ``recurrent_delta_rule``.
        chunk_size: tokens per chunk, a positive integer; the forward substitution is ``chunk_size * n_h`` steps
            long and a per-channel gate needs memory ``(chunk_size * n_h) ** 2 * K`` per chunk.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, H, L, V]`` in the dtype of ``q``; ``final_state`` ``[B, H, K, V]`` or
        ``None`` when ``output_final_state`` is false.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"delta rule: chunk_size must be a positive integer, got {chunk_size!r}")
    q, k, v, beta, g = _prepare(q, k, v, beta, g, initial_state)
    _, _, length, key_dim = q.shape
    steps, value_dim = k.shape[3], v.shape[4]
    if scale is None:
        scale = key_dim**-0.5
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype)
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    state = None if initial_state is None else initial_state.to(dtype)
    if not torch.jit.is_tracing() and length == 0:
        if state is None:
            state = q.new_zeros(q.shape[0], q.shape[1], key_dim, value_dim)
        return v.new_zeros(q.shape[0], q.shape[1], 0, value_dim).to(out_dtype), (state if output_final_state else None)

    tokens = min(chunk_size, length)
    chunks = math.ceil(length / tokens)
    padding = chunks * tokens - length
    size = tokens * steps

    def chunked(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
        """[B, H, L, *rest] -> [B, H, chunks, tokens * n_h or tokens, *rest], padded with zeros at the end."""
        padded = F.pad(tensor, (0, 0) * trailing + (0, padding))
        return padded.unflatten(2, (chunks, tokens)).flatten(3, 3 + trailing - 1) if trailing > 1 else padded.unflatten(2, (chunks, tokens))

    q_chunks = chunked(q, 1)
    k_chunks = chunked(k, 2)
    v_chunks = chunked(v, 2)
    beta_chunks = chunked(beta, 1).flatten(3, 4).unsqueeze(-1)
    if g is None:
        decay = q.new_zeros(1, 1, chunks, size, 1)
    else:
        # The gate acts on the first step of each token and not on the others: [B, H, L, n_h, 1 or K].
        decay = chunked(F.pad(g.to(dtype).unsqueeze(3), (0, 0, 0, steps - 1)), 2).cumsum(dim=3)
    token_decay = decay.unflatten(3, (tokens, steps))[:, :, :, :, -1]
    end_decay = decay[:, :, :, -1:]

    device = q.device
    step_index = torch.arange(size, device=device)
    strictly_earlier = step_index.unsqueeze(1) > step_index.unsqueeze(0)
    read_index = torch.arange(tokens, device=device) * steps + steps - 1
    read_mask = read_index.unsqueeze(1) >= step_index.unsqueeze(0)

    lower = beta_chunks * _decayed_scores(k_chunks, decay, k_chunks, decay, strictly_earlier)
    right = torch.cat([beta_chunks * k_chunks * decay.exp(), beta_chunks * v_chunks], dim=-1)
    solved_keys, solved_values = _forward_substitution(lower, right).split([key_dim, value_dim], dim=-1)
    scores = _decayed_scores(q_chunks, token_decay, k_chunks, decay, read_mask)
    decayed_queries = q_chunks * token_decay.exp()
    decayed_keys = k_chunks * (end_decay - decay).exp()

    outputs = []
    for c in range(chunks):
        if state is None:
            values = solved_values[:, :, c]
            outputs.append(scores[:, :, c] @ values)
            state = decayed_keys[:, :, c].transpose(-1, -2) @ values
        else:
            values = solved_values[:, :, c] - solved_keys[:, :, c] @ state
            outputs.append(decayed_queries[:, :, c] @ state + scores[:, :, c] @ values)
            state = state * end_decay[:, :, c].transpose(-1, -2).exp() + decayed_keys[:, :, c].transpose(-1, -2) @ values
    o = torch.cat(outputs, dim=2)[:, :, :length] * scale
    return o.to(out_dtype), (state if output_final_state else None)
