"""The EfficientViM block: a MetaFormer block whose token mixer is the hidden state mixer based SSD (HSM-SSD).

Lee et al., "EfficientViM: Efficient Vision Mamba with Hidden State Mixer based State Space Duality", 2025. On an
image the state space duality is non-causal: every token writes to N hidden states and reads from all of them, so
the whole layer is two matrix products around a small [N, C] hidden state. For x: [B, C, H, W], L = H * W tokens
and N = ``state_dim``:

* ``b = local_b(proj_b(x))``, ``c = local_c(proj_c(x))``: C -> N by a 1x1 convolution, then a depthwise 3x3
  convolution (the paper's local convolution on B, C and dt), both with bias;
* ``h = b X^T / L``: [B, N, L] @ [B, L, C] -> [B, N, C], the hidden states as a B-weighted mean of the tokens X;
* the hidden state mixer, on h only: ``v = hidden(h)``, ``z = gate(h)`` (C -> C each), ``h = output(v * silu(z) +
  skip * v)`` (C -> C; ``skip`` is the paper's D); its cost is 3 * N * C^2 multiply-accumulates whatever the
  number of tokens, which is the point of the design: the paper moves the gating and the output projection from
  the L tokens to the N hidden states;
* ``y = h^T c``: [B, C, N] @ [B, N, L] -> [B, C, L], reshaped to [B, C, H, W].

Simplifications, so the layer exports with standard ONNX ops (MatMul, Conv, Sigmoid): the paper's per-state
softmax over tokens of ``dt + A`` (a learned token weighting of B) is replaced by the plain mean ``1 / L``, so no
``dt`` projection and no ``A``; its multi-stage hidden state fusion spans stages and is not part of one block.

Elastic: ``state_dim`` (the leading N rows of ``proj_b`` and ``proj_c`` and channels of the local convolutions;
``reorder_channels`` sorts the states), the block width (leading channels of every projection), plus the shared
FFN fields. The block is the image MetaFormer skeleton of ``image_metaformer.py`` (batch norms, then the shared
feed-forward network of ``metaformer.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticConv2d, ElasticLinear, importance_order
from .base import BlockChoices, BlockContext, IntRule, choice, register_block
from .image_metaformer import ElasticImageMetaFormerBlock, ElasticImageMixer, ImageMetaFormerBlock
from .metaformer import activation_field, ffn_field, mlp_ratio_field


@dataclass(frozen=True, slots=True)
class HSMSSDConfig:
    """Hidden state mixer SSD token mixer, then a feed-forward network."""

    state_dim: int = choice(IntRule(2, 256), "number of hidden states N (rows of B and C)", shrinks="width")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


class HiddenSkip(nn.Module):
    """The learnable scalar skip ``D`` of the hidden state mixer: v: [...] -> ``D * v``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.scale

    def export(self) -> HiddenSkip:
        skip = HiddenSkip()
        with torch.no_grad():
            skip.scale.copy_(self.scale)
        return skip


def state_space_duality(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, mixer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Non-causal SSD with a hidden state mixer. x: [B, C, H, W]; b, c: [B, N, H, W]; mixer: [B, N, C] -> [B, N, C].

    Returns ``mixer(b X^T / L)^T c`` reshaped to [B, C, H, W], with X = x as [B, L, C] and L = H * W.
    """
    tokens = x.flatten(2)
    states = b.flatten(2) @ tokens.transpose(1, 2) / (x.shape[-2] * x.shape[-1])
    return (mixer(states).transpose(1, 2) @ c.flatten(2)).reshape(x.shape)


class HiddenStateMixerSSD(nn.Module):
    """Static HSM-SSD token mixer (see the module docstring). x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, config: HSMSSDConfig, context: BlockContext) -> None:
        super().__init__()
        channels, states = context.in_channels, config.state_dim
        self.proj_b = nn.Conv2d(channels, states, 1)
        self.proj_c = nn.Conv2d(channels, states, 1)
        self.local_b = nn.Conv2d(states, states, 3, padding=1, groups=states)
        self.local_c = nn.Conv2d(states, states, 3, padding=1, groups=states)
        self.hidden = nn.Linear(channels, channels)
        self.gate = nn.Linear(channels, channels)
        self.skip = HiddenSkip()
        self.output = nn.Linear(channels, channels)

    def mix(self, states: torch.Tensor) -> torch.Tensor:
        """The hidden state mixer. states: [B, N, C] -> [B, N, C]."""
        value = self.hidden(states)
        return self.output(value * F.silu(self.gate(states)) + self.skip(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return state_space_duality(x, self.local_b(self.proj_b(x)), self.local_c(self.proj_c(x)), self.mix)


class ElasticHiddenStateMixerSSD(ElasticImageMixer):
    """HSM-SSD token mixer with elastic width and state count."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels, states = context.in_channels, max(choices["state_dim"])
        self.proj_b = ElasticConv2d(channels, states, bias=True)
        self.proj_c = ElasticConv2d(channels, states, bias=True)
        self.local_b = ElasticConv2d(states, states, (3,), depthwise=True, bias=True)
        self.local_c = ElasticConv2d(states, states, (3,), depthwise=True, bias=True)
        self.hidden = ElasticLinear(channels, channels)
        self.gate = ElasticLinear(channels, channels)
        self.skip = HiddenSkip()
        self.output = ElasticLinear(channels, channels)

    def forward(self, x: torch.Tensor, config: HSMSSDConfig, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> [B, channels, H, W]."""
        states = config.state_dim

        def mix(hidden_states: torch.Tensor) -> torch.Tensor:
            value = self.hidden(hidden_states, channels, channels)
            return self.output(value * F.silu(self.gate(hidden_states, channels, channels)) + self.skip(value), channels, channels)

        b = self.local_b(self.proj_b(x, channels, states, 1), states, states, 3)
        c = self.local_c(self.proj_c(x, channels, states, 1), states, states, 3)
        return state_space_duality(x, b, c, mix)

    def export_layers(self, config: HSMSSDConfig, channels: int) -> dict[str, nn.Module]:
        states = config.state_dim
        return {
            "proj_b": self.proj_b.export(channels, states, 1),
            "proj_c": self.proj_c.export(channels, states, 1),
            "local_b": self.local_b.export(states, states, 3),
            "local_c": self.local_c.export(states, states, 3),
            "hidden": self.hidden.export(channels, channels),
            "gate": self.gate.export(channels, channels),
            "skip": self.skip.export(),
            "output": self.output.export(channels, channels),
        }

    def reorder_channels(self) -> None:
        """Sort the hidden states by the L1 norm of their rows of ``proj_b`` and ``proj_c``; the local convolutions
        move with them. The hidden state mixer acts on each state alike and ``y`` sums over the states, so the output
        is unchanged at every state count (and the smaller counts keep the most important states)."""
        scores = self.proj_b.weight.detach().abs().flatten(1).sum(1) + self.proj_c.weight.detach().abs().flatten(1).sum(1)
        order = importance_order(scores, 0)
        for layer in (self.proj_b, self.proj_c, self.local_b, self.local_c):
            layer.permute_(out_order=order)


class EfficientViMBlock(ImageMetaFormerBlock):
    """Static EfficientViM block (see ``HiddenStateMixerSSD``)."""

    token_mixer_class = HiddenStateMixerSSD
    block_name = "hsm_ssd"


@register_block("hsm_ssd", config=HSMSSDConfig, static=EfficientViMBlock, modalities=("image",), reshapes=False)
class ElasticEfficientViMBlock(ElasticImageMetaFormerBlock):
    """Elastic EfficientViM block: state_dim, ffn kind, mlp_ratio, activation and the width are elastic."""

    token_mixer_class = ElasticHiddenStateMixerSSD


__all__ = [
    "EfficientViMBlock",
    "ElasticEfficientViMBlock",
    "ElasticHiddenStateMixerSSD",
    "HSMSSDConfig",
    "HiddenSkip",
    "HiddenStateMixerSSD",
    "state_space_duality",
]
