"""The TCNCA block: a MetaFormer block whose token mixer is a dilated causal TCN followed by chunked attention.

TCNCA (Bulat et al. 2023, "TCNCA: Temporal Convolution Network with Chunked Attention for Scalable Sequence
Processing") replaces MEGA's exponential moving average with a dilated temporal convolution network and keeps MEGA's
chunked attention. Token mixer (always causal), for x: [B, L, C], heads H of width D:

* ``tcn``: ``tcn_depth`` layers ``h <- h + silu(conv_i(h))`` starting from ``h = x``, where ``conv_i`` is a causal
  depthwise convolution over time (kernel ``kernel_size``, dilation ``2 ** i``, with bias), so the receptive field
  is ``(kernel_size - 1) * (2 ** tcn_depth - 1) + 1`` tokens;
* ``query``, ``key`` (C -> H * D) from the TCN output and ``value`` (C -> H * D) from x, as in MEGA, with bias;
* causal softmax attention inside non-overlapping chunks of ``chunk_size`` tokens (scale ``D ** -0.5``; the
  sequence is zero-padded at the end up to a multiple of the chunk size and the padding never reaches a real
  query; a chunk longer than the sequence is the whole sequence);
* ``output`` (H * D -> C, with bias).

Elastic: tcn_depth (the leading layers), kernel_size (the *trailing* taps of each layer's largest kernel: the tap
``i`` places from the end weighs the input ``i * 2 ** layer`` steps back at every kernel size, the causal counterpart
of a centred kernel), chunk_size (a switch, no parameters), heads (leading heads), head_dim (leading dims of each
head), plus the shared FFN fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticLinear, attention_orders, head_rows
from .base import BlockChoices, BlockContext, IntRule, choice, register_block
from .delta import CausalDepthwiseConv, ElasticCausalDepthwiseConv
from .metaformer import (
    ElasticMetaFormerBlock,
    ElasticTokenMixer,
    MetaFormerBlock,
    activation_field,
    ffn_field,
    mlp_ratio_field,
)


@dataclass(frozen=True, slots=True)
class TCNCAConfig:
    """Dilated causal temporal convolutions, then chunked causal attention, then a feed-forward network."""

    tcn_depth: int = choice(IntRule(1, 12), "temporal convolution layers (dilations 1, 2, 4, ...)", shrinks="kernel")
    kernel_size: int = choice(IntRule(2, 16), "taps of each causal temporal convolution", shrinks="kernel")
    chunk_size: int = choice(IntRule(2, 65536), "tokens per attention chunk (attention stays inside a chunk)", shrinks="switch")
    num_heads: int = choice(IntRule(1, 64), "attention heads", shrinks="width")
    head_dim: int = choice(IntRule(4, 256), "query, key and value width of each head", shrinks="width")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def chunked_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, head_dim: int, chunk_size: int) -> torch.Tensor:
    """Causal softmax attention inside non-overlapping chunks of ``chunk_size`` tokens.

    query, key, value: [B, L, num_heads * head_dim] (head-major) -> [B, L, num_heads * head_dim]. Plain matmul,
    masking and softmax, so it exports to standard ONNX ops (at a fixed sequence length).
    """
    length = int(query.shape[1])
    size = min(chunk_size, length)
    chunks = math.ceil(length / size)
    padding = chunks * size - length

    def split(tensor: torch.Tensor) -> torch.Tensor:
        """[B, L, H * D] -> [B, H, chunks, size, D]."""
        return F.pad(tensor, (0, 0, 0, padding)).unflatten(1, (chunks, size)).unflatten(-1, (num_heads, head_dim)).permute(0, 3, 1, 2, 4)

    scores = split(query) @ split(key).transpose(-1, -2) * head_dim**-0.5
    positions = torch.arange(size, device=query.device)
    scores = scores.masked_fill(positions.unsqueeze(0) > positions.unsqueeze(1), float("-inf"))
    heads = scores.softmax(dim=-1) @ split(value)
    return heads.permute(0, 2, 3, 1, 4).flatten(3).flatten(1, 2)[:, :length]


class TCNCALayer(nn.Module):
    """Static TCNCA token mixer (see the module docstring). x: [B, L, C] -> [B, L, C]."""

    def __init__(self, config: TCNCAConfig, context: BlockContext) -> None:
        super().__init__()
        channels, width = context.in_channels, config.num_heads * config.head_dim
        self.config = config
        self.tcn = nn.ModuleList(CausalDepthwiseConv(channels, config.kernel_size, 2**layer, bias=True) for layer in range(config.tcn_depth))
        self.query = nn.Linear(channels, width)
        self.key = nn.Linear(channels, width)
        self.value = nn.Linear(channels, width)
        self.output = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x
        for conv in self.tcn:
            hidden = hidden + F.silu(conv(hidden))
        config = self.config
        heads = chunked_causal_attention(self.query(hidden), self.key(hidden), self.value(x), config.num_heads, config.head_dim, config.chunk_size)
        return self.output(heads)


class ElasticTCNCALayer(ElasticTokenMixer):
    """TCNCA token mixer with elastic width, TCN depth and kernel, chunk size, heads and head_dim."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        self.max_heads = max(choices["num_heads"])
        self.max_head_dim = max(choices["head_dim"])
        kernel_sizes = tuple(choices["kernel_size"])
        self.tcn = nn.ModuleList(ElasticCausalDepthwiseConv(channels, kernel_sizes, 2**layer, bias=True) for layer in range(max(choices["tcn_depth"])))
        width = self.max_heads * self.max_head_dim
        self.query = ElasticLinear(channels, width)
        self.key = ElasticLinear(channels, width)
        self.value = ElasticLinear(channels, width)
        self.output = ElasticLinear(width, channels)

    def _rows(self, config: TCNCAConfig, device: torch.device) -> torch.Tensor:
        return head_rows(config.num_heads, config.head_dim, self.max_head_dim, device)

    def forward(self, x: torch.Tensor, config: TCNCAConfig, channels: int) -> torch.Tensor:
        """x: [B, L, channels] -> [B, L, channels]."""
        hidden = x
        for conv in self.tcn[: config.tcn_depth]:
            hidden = hidden + F.silu(conv(hidden, channels, config.kernel_size))
        rows = self._rows(config, x.device)
        heads = chunked_causal_attention(
            self.query(hidden, channels, rows),
            self.key(hidden, channels, rows),
            self.value(x, channels, rows),
            config.num_heads,
            config.head_dim,
            config.chunk_size,
        )
        return self.output(heads, rows, channels)

    def reorder_channels(self) -> None:
        """Sort the heads by the L1 norm of the output projection's columns on them; inside each head, sort the
        query/key dims (together, which keeps every score) by the L1 norm of their query and key rows, and the value
        dims by the output projection's columns. The TCN acts on the block's channels, which the supernet owns."""
        _, key_rows, value_rows = attention_orders(self.query.weight, self.key.weight, self.output.weight, self.max_heads, self.max_head_dim)
        self.query.permute_(out_order=key_rows)
        self.key.permute_(out_order=key_rows)
        self.value.permute_(out_order=value_rows)
        self.output.permute_(in_order=value_rows)

    def export_layers(self, config: TCNCAConfig, channels: int) -> dict[str, nn.Module]:
        rows = self._rows(config, self.query.weight.device)
        convs = cast(list[ElasticCausalDepthwiseConv], list(self.tcn[: config.tcn_depth]))
        layers: dict[str, nn.Module] = {f"tcn.{layer}": conv.export(channels, config.kernel_size) for layer, conv in enumerate(convs)}
        layers.update(
            {
                "query": self.query.export(channels, rows),
                "key": self.key.export(channels, rows),
                "value": self.value.export(channels, rows),
                "output": self.output.export(rows, channels),
            }
        )
        return layers


class TCNCA(MetaFormerBlock):
    """Static TCNCA block (see ``TCNCALayer``)."""

    token_mixer_class = TCNCALayer


@register_block("tcnca", config=TCNCAConfig, static=TCNCA, modalities=("sequence",), reshapes=False)
class ElasticTCNCA(ElasticMetaFormerBlock):
    """Elastic TCNCA block: TCN depth and kernel, chunk size, heads, head_dim and the FFN fields are elastic."""

    token_mixer_class = ElasticTCNCALayer


__all__ = ["TCNCA", "ElasticTCNCA", "ElasticTCNCALayer", "TCNCAConfig", "TCNCALayer", "chunked_causal_attention"]
