"""Kernels: each operation has a readable PyTorch reference (the CPU and ONNX export path) and, where written, a
Triton kernel.

Installed as ``nas.kernels``; ``gated_linear_attention`` picks the Triton kernel when ``supports`` allows it;
``delta_rule`` (the gated delta rule with Householder products) runs its chunkwise PyTorch reference everywhere.
"""

from .delta import delta_rule
from .gla import gated_linear_attention

__all__ = ["delta_rule", "gated_linear_attention"]
