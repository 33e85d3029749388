"""The gated linear attention block: a MetaFormer block whose token mixer is the GLA layer of Yang et al. 2023.

GLA layer (always causal), for x: [B, L, C], heads H, per-head key width K and value width V:

* ``q = x W_q``, ``k = x W_k`` (C -> H * K), ``v = x W_v`` (C -> H * V), no bias;
* forget gate through a rank-16 projection, ``g = logsigmoid(x W_down W_up + b) / 16`` (C -> 16 -> H * K; the
  paper's temperature tau = 16), so ``alpha = exp(g)`` is in (0, 1);
* ``o = gated_linear_attention(q, k, v, g)`` per head (``nas.kernels.gla``, the chunkwise reference on CPU and in
  ONNX export);
* per-head normalisation: LayerNorm over the V features of each head, with one learnable scale and shift of size V
  shared by all heads (the paper's GroupNorm with groups = heads, normalised alike; sharing the affine makes the
  value width elastic with a plain leading slice);
* output gate ``o * silu(x W_r + b_r)`` (C -> H * V) and ``W_o`` (H * V -> C), no bias.

Elastic: heads (leading heads), key_dim (leading dims of each head of q, k and the gate's up-projection), value_dim
(leading dims of each head of v, the output gate and the columns of ``W_o``), plus the shared FFN fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas.kernels.gla import gated_linear_attention

from ..elastic import ElasticLayerNorm, ElasticLinear, head_major_order, head_rows, importance_order
from .base import BlockChoices, BlockContext, IntRule, choice, register_block
from .metaformer import (
    ElasticMetaFormerBlock,
    ElasticTokenMixer,
    MetaFormerBlock,
    activation_field,
    ffn_field,
    mlp_ratio_field,
)

GATE_RANK = 16
GATE_TEMPERATURE = 16.0


@dataclass(frozen=True, slots=True)
class GLAConfig:
    """Gated linear attention token mixer, then a feed-forward network."""

    num_heads: int = choice(IntRule(1, 64), "attention heads", shrinks="width")
    key_dim: int = choice(IntRule(4, 256), "key width of each head (rows of its recurrent state)", shrinks="width")
    value_dim: int = choice(IntRule(4, 512), "value width of each head (columns of its recurrent state)", shrinks="width")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def gla_mix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    forget: torch.Tensor,
    output_gate: torch.Tensor,
    config: GLAConfig,
    head_norm: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The GLA layer between its input and output projections.

    query, key, forget: [B, L, H * K] (head-major; ``forget`` holds the gate logits); value, output_gate:
    [B, L, H * V]; head_norm: [B, L, H, V] -> same shape. Returns [B, L, H * V].
    """

    def split(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
        return tensor.unflatten(-1, (config.num_heads, head_dim)).transpose(1, 2)

    # logsigmoid(x) written as -softplus(-x): ONNX exports logsigmoid as Log(Sigmoid(x)), which is -inf for x < -20.
    log_forget = -F.softplus(-split(forget, config.key_dim)) / GATE_TEMPERATURE
    heads, _ = gated_linear_attention(split(query, config.key_dim), split(key, config.key_dim), split(value, config.value_dim), log_forget)
    return head_norm(heads.transpose(1, 2)).flatten(2) * F.silu(output_gate)


class GatedLinearAttentionLayer(nn.Module):
    """Static GLA token mixer (see the module docstring). x: [B, L, C] -> [B, L, C]."""

    def __init__(self, config: GLAConfig, context: BlockContext) -> None:
        super().__init__()
        channels = context.in_channels
        key_width, value_width = config.num_heads * config.key_dim, config.num_heads * config.value_dim
        self.config = config
        self.query = nn.Linear(channels, key_width, bias=False)
        self.key = nn.Linear(channels, key_width, bias=False)
        self.value = nn.Linear(channels, value_width, bias=False)
        self.forget_down = nn.Linear(channels, GATE_RANK, bias=False)
        self.forget_up = nn.Linear(GATE_RANK, key_width)
        self.output_gate = nn.Linear(channels, value_width)
        self.head_norm = nn.LayerNorm(config.value_dim)
        self.output = nn.Linear(value_width, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = gla_mix(
            self.query(x),
            self.key(x),
            self.value(x),
            self.forget_up(self.forget_down(x)),
            self.output_gate(x),
            self.config,
            self.head_norm,
        )
        return self.output(heads)


class ElasticGatedLinearAttentionLayer(ElasticTokenMixer):
    """GLA token mixer with elastic width, heads, key_dim and value_dim."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        max_heads = self.max_heads = max(choices["num_heads"])
        self.max_key_dim = max(choices["key_dim"])
        self.max_value_dim = max(choices["value_dim"])
        key_width, value_width = max_heads * self.max_key_dim, max_heads * self.max_value_dim
        self.query = ElasticLinear(channels, key_width, bias=False)
        self.key = ElasticLinear(channels, key_width, bias=False)
        self.value = ElasticLinear(channels, value_width, bias=False)
        self.forget_down = ElasticLinear(channels, GATE_RANK, bias=False)
        self.forget_up = ElasticLinear(GATE_RANK, key_width)
        self.output_gate = ElasticLinear(channels, value_width)
        self.head_norm = ElasticLayerNorm(self.max_value_dim)
        self.output = ElasticLinear(value_width, channels, bias=False)

    def _rows(self, config: GLAConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the active key and value features inside the largest head-major layouts."""
        return (
            head_rows(config.num_heads, config.key_dim, self.max_key_dim, device),
            head_rows(config.num_heads, config.value_dim, self.max_value_dim, device),
        )

    def forward(self, x: torch.Tensor, config: GLAConfig, channels: int) -> torch.Tensor:
        """x: [B, L, channels] -> [B, L, channels]."""
        key_rows, value_rows = self._rows(config, x.device)
        heads = gla_mix(
            self.query(x, channels, key_rows),
            self.key(x, channels, key_rows),
            self.value(x, channels, value_rows),
            self.forget_up(self.forget_down(x, channels, GATE_RANK), GATE_RANK, key_rows),
            self.output_gate(x, channels, value_rows),
            config,
            lambda heads: self.head_norm(heads, config.value_dim),
        )
        return self.output(heads, value_rows, channels)

    def reorder_channels(self) -> None:
        """Sort the heads by the L1 norm of the output projection's columns on them; inside each head, sort the
        key dims (query, key and forget-gate rows together: the recurrent state's rows permute, the output does not
        change) by the L1 norm of their query and key rows. Value dims keep their order: the head norm's weights
        are shared by every head, so one head's value order is every head's."""
        heads, key_dim, value_dim = self.max_heads, self.max_key_dim, self.max_value_dim
        output = self.output.weight.detach().abs()
        head_order = importance_order(output.reshape(-1, heads, value_dim).sum(dim=2), 1)
        query_key = (self.query.weight.detach().abs().sum(1) + self.key.weight.detach().abs().sum(1)).reshape(heads, key_dim)
        key_rows = head_major_order(head_order, torch.argsort(-query_key, dim=1, stable=True), key_dim)
        value_rows = head_major_order(head_order, None, value_dim)
        self.query.permute_(out_order=key_rows)
        self.key.permute_(out_order=key_rows)
        self.forget_up.permute_(out_order=key_rows)
        self.value.permute_(out_order=value_rows)
        self.output_gate.permute_(out_order=value_rows)
        self.output.permute_(in_order=value_rows)

    def export_layers(self, config: GLAConfig, channels: int) -> dict[str, nn.Module]:
        key_rows, value_rows = self._rows(config, self.query.weight.device)
        return {
            "query": self.query.export(channels, key_rows),
            "key": self.key.export(channels, key_rows),
            "value": self.value.export(channels, value_rows),
            "forget_down": self.forget_down.export(channels, GATE_RANK),
            "forget_up": self.forget_up.export(GATE_RANK, key_rows),
            "output_gate": self.output_gate.export(channels, value_rows),
            "head_norm": self.head_norm.export(config.value_dim),
            "output": self.output.export(value_rows, channels),
        }


class GatedLinearAttention(MetaFormerBlock):
    """Static gated linear attention block (see ``GatedLinearAttentionLayer``)."""

    token_mixer_class = GatedLinearAttentionLayer


@register_block("gla", config=GLAConfig, static=GatedLinearAttention, modalities=("sequence",), reshapes=False)
class ElasticGatedLinearAttention(ElasticMetaFormerBlock):
    """Elastic gated linear attention block: heads, key_dim, value_dim and the FFN fields are elastic."""

    token_mixer_class = ElasticGatedLinearAttentionLayer


__all__ = [
    "GATE_RANK",
    "GATE_TEMPERATURE",
    "ElasticGatedLinearAttention",
    "ElasticGatedLinearAttentionLayer",
    "GLAConfig",
    "GatedLinearAttention",
    "GatedLinearAttentionLayer",
    "gla_mix",
]
