"""Helpers shared by tests (on sys.path through pytest's ``pythonpath``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from nas.supernets.elastic import ElasticBatchNorm2d

TINY_DIGITS_SPACE = """\
name: tiny
task: {dataset: digits, input_shape: [1, 8, 8], num_classes: 10}
stem: {channels: 8, kernel_size: 3, stride: 1, activation: relu}
stages:
  - depth: [1, 2]
    width: [8, 12]
    stride: 2
    blocks:
      - {type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 3], activation: relu, squeeze_excite: [false, true]}
head: {channels: [32]}
resolution: [6, 8]
"""
"""A one-stage MBConv space on 8x8 digits (144 subnets), without a training section: tests append their own."""


def randomise_batch_norm(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every (elastic) batch norm random running statistics and affine parameters, so that parity checks
    exercise them instead of the identity defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, ElasticBatchNorm2d | torch.nn.BatchNorm2d):
                size = norm.running_mean.shape[0]
                norm.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                norm.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(size, generator=generator) * 0.1)


def load_benchmark(name: str) -> Any:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package), imported once."""
    module_name = f"{name}_benchmark"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]
