"""Gated linear attention (GLA): the Triton kernel where it applies, the chunkwise PyTorch reference otherwise.

Shapes: ``q, k, g: [B, H, L, K]``, ``v: [B, H, L, V]``, ``o: [B, H, L, V]``, states ``[B, H, K, V]``;
``g <= 0`` is the log forget gate. See ``reference`` for the recurrence.
"""

from __future__ import annotations

import logging

import torch

from .._dispatch import is_exporting_or_tracing, log_fallback_once, triton_status
from .reference import chunk_gla, recurrent_gla

__all__ = ["chunk_gla", "gated_linear_attention", "recurrent_gla", "supports"]

logger = logging.getLogger(__name__)

_TRITON_CHUNK_SIZES = (16, 32)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
) -> tuple[bool, str]:
    """Whether the Triton kernel can run these inputs: ``(True, "")`` or ``(False, reason)``.

    Needs: CUDA tensors on one device, q, k, v, g of one dtype among float16, bfloat16, float32, the shapes
    ``q, k, g: [B, H, L, K]``, ``v: [B, H, L, V]`` with ``L >= 1``, ``chunk_size`` in {16, 32}, an
    ``initial_state`` of shape ``[B, H, K, V]`` on the same device, and an importable ``triton``.
    Head dimensions need not be powers of two (the kernels mask partial blocks).
    """
    tensors = {"q": q, "k": k, "v": v, "g": g}
    if initial_state is not None:
        tensors["initial_state"] = initial_state
    for name, tensor in tensors.items():
        if tensor.device.type != "cuda":
            return False, f"{name} is on {tensor.device.type}, the Triton kernel needs CUDA tensors"
    devices = {tensor.device for tensor in tensors.values()}
    if len(devices) > 1:
        return False, f"inputs are on several devices {sorted(str(device) for device in devices)}"
    dtypes = {tensor.dtype for name, tensor in tensors.items() if name != "initial_state"}
    if len(dtypes) > 1:
        return False, f"q, k, v, g must share one dtype, got {sorted(str(dtype) for dtype in dtypes)}"
    if q.dtype not in _TRITON_DTYPES:
        return False, f"dtype must be one of float16, bfloat16, float32, got {q.dtype}"
    if initial_state is not None and not initial_state.dtype.is_floating_point:
        return False, f"initial_state must be floating point, got {initial_state.dtype}"
    if any(tensor.dim() != 4 for tensor in (q, k, v, g)):
        return False, "q, k, v, g must have 4 dimensions [B, H, L, D]"
    if k.shape != q.shape or g.shape != q.shape or v.shape[:3] != q.shape[:3]:
        return False, "shapes must be q, k, g: [B, H, L, K] and v: [B, H, L, V]"
    if q.shape[2] == 0:
        return False, "sequence length is 0"
    if initial_state is not None and tuple(initial_state.shape) != (*q.shape[:2], q.shape[3], v.shape[3]):
        return False, "initial_state must have shape [B, H, K, V]"
    if chunk_size not in _TRITON_CHUNK_SIZES:
        return False, f"chunk_size must be one of {list(_TRITON_CHUNK_SIZES)} for the Triton kernel, got {chunk_size}"
    return triton_status()


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

    Args:
        q: queries ``[B, H, L, K]``.
        k: keys ``[B, H, L, K]``.
        v: values ``[B, H, L, V]``.
        g: log forget gate ``[B, H, L, K]``, ``g <= 0``.
        scale: multiplies ``q S``; ``K ** -0.5`` when ``None``.
        chunk_size: steps per chunk.
        initial_state: ``S_0`` ``[B, H, K, V]``; zeros when ``None``.
        output_final_state: also return ``S_L``.

    Returns:
        ``(o [B, H, L, V] in the dtype of q, final_state [B, H, K, V] | None)``; the final state is float32
        for float16/bfloat16/float32 inputs on either path, float64 for float64 inputs (reference only).

    Runs the Triton kernel when ``supports(...)`` allows it, else ``chunk_gla`` (logging the reason once per
    distinct reason). ONNX export and ``torch.jit`` tracing always record ``chunk_gla``.
    """
    if is_exporting_or_tracing():
        return chunk_gla(q, k, v, g, scale, chunk_size, initial_state, output_final_state)
    ok, reason = supports(q, k, v, g, chunk_size=chunk_size, initial_state=initial_state)
    if not ok:
        log_fallback_once(logger, "gated_linear_attention", reason, on_gpu=q.device.type == "cuda")
        return chunk_gla(q, k, v, g, scale, chunk_size, initial_state, output_final_state)
    from .triton import chunk_gla_triton

    return chunk_gla_triton(q, k, v, g, scale, chunk_size, initial_state, output_final_state)
