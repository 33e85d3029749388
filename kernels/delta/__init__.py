"""The gated delta rule with Householder products (DeltaNet, Gated DeltaNet, KDA, DeltaProduct).

Shapes: ``q: [B, H, L, K]``, ``k: [B, H, L, n_h, K]``, ``v: [B, H, L, n_h, V]``, ``beta: [B, H, L, n_h]``, ``g:
[B, H, L]`` or ``[B, H, L, K]`` or ``None``, ``o: [B, H, L, V]``, states ``[B, H, K, V]``. See ``reference`` for the
recurrence. There is no Triton kernel yet: ``delta_rule`` runs the chunkwise PyTorch reference on every device.
"""

from __future__ import annotations

import logging

import torch

from .._dispatch import is_exporting_or_tracing, log_fallback_once
from .reference import chunk_delta_rule, recurrent_delta_rule

__all__ = ["chunk_delta_rule", "delta_rule", "recurrent_delta_rule"]

logger = logging.getLogger(__name__)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule: per token ``S <- diag(exp(g_t)) S``, then for each step ``j``
    ``S <- (I - beta k k^T) S + beta k v^T``; ``o_t = scale * S^T q_t``.

    Args:
        q: queries ``[B, H, L, K]``.
        k: keys ``[B, H, L, n_h, K]`` (or ``[B, H, L, K]`` for ``n_h = 1``), unit norm.
        v: values ``[B, H, L, n_h, V]`` (or ``[B, H, L, V]``).
        beta: step sizes ``[B, H, L, n_h]`` (or ``[B, H, L]``).
        g: log decay ``[B, H, L]`` or ``[B, H, L, K]``, ``<= 0``; ``None``: no decay.
        scale: multiplies ``S^T q``; ``K ** -0.5`` when ``None``.
        chunk_size: tokens per chunk.
        initial_state: ``S_0`` ``[B, H, K, V]``; zeros when ``None``.
        output_final_state: also return ``S_L``.

    Returns:
        ``(o [B, H, L, V] in the dtype of q, final_state [B, H, K, V] | None)``.

    Always runs ``chunk_delta_rule`` (there is no Triton kernel yet); on a GPU that fallback is logged once.
    """
    if not is_exporting_or_tracing() and q.device.type == "cuda":
        log_fallback_once(logger, "delta_rule", "no Triton kernel for the delta rule yet", on_gpu=True)
    return chunk_delta_rule(q, k, v, beta, g, scale, chunk_size, initial_state, output_final_state)
