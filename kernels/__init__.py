"""Kernels: each operation has a readable PyTorch reference (the CPU and ONNX export path) and a Triton kernel.

Installed as ``nas.kernels``; ``gated_linear_attention`` picks the Triton kernel when ``supports`` allows it.
"""

from .gla import gated_linear_attention

__all__ = ["gated_linear_attention"]
