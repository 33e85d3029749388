"""The SLAB block: simplified linear attention (SLA) with a batch-norm option that folds away at extraction.

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization" (Guo et al., ICML 2024). A MetaFormer block, ``x + SLA(norm1(x))`` then ``x + ffn(norm2(x))``.

Simplified linear attention, per head, with heads H and head width D (queries, keys and values alike):

* ``q = x W_q``, ``k = x W_k``, ``v = x W_v`` (C -> H * D, with bias), ``phi = relu``;
* non-causal (images): ``o = phi(q) (phi(k)^T v) / (phi(q) (phi(k)^T 1) + eps)``, linear in the token count;
* causal (sequences): ``A = tril(phi(q) phi(k)^T)``, ``o = A v / (A 1 + eps)`` (the same quantity restricted to the
  past; written as a masked product, which ONNX exports with plain MatMul);
* a depthwise convolution on the values is added, ``o + dwc(v)``, which SLAB keeps for local detail: 3 x 3 over the
  image, or a causal 1 x 3 band over the sequence;
* ``W_o`` (H * D -> C, with bias).

``norm`` chooses the block's two normalisations: ``layer_norm``, or ``repbn``, SLAB's re-parameterised batch norm
``BN(x) + eta * x`` (a learnable scalar ``eta`` per norm). A batch norm at inference is a per-channel affine map, so
``extract()`` folds it into the layers that read the normalised tokens (query, key, value; the FFN's ``up`` and
``gate``): the static block has no normalisation layer left, which is SLAB's point (no statistics at inference,
and an INT8-friendly graph). SLAB's *progressive* schedule, a LayerNorm blended into the batch norm with a weight
decaying to zero during training, is not implemented: it needs the training progress, which the strategy protocol
does not give blocks; ``repbn`` is the schedule's end point.

Elastic: heads (leading heads), head_dim (leading dims of each head; the value convolution follows the same rows),
norm (a switch), and the shared FFN fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..elastic import ElasticBatchNorm2d, ElasticConv2d, ElasticLayerNorm, ElasticLinear, attention_orders, head_rows
from .base import BlockChoices, BlockContext, ElasticBlock, IntRule, OptionRule, choice, register_block
from .metaformer import ElasticFeedForward, FeedForward, activation_field, check_width_preserving, ffn_field, mlp_ratio_field

NORMS = ("layer_norm", "repbn")
VALUE_KERNEL = 3
EPS = 1e-6


@dataclass(frozen=True, slots=True)
class SLAConfig:
    """Simplified linear attention token mixer, then a feed-forward network."""

    num_heads: int = choice(IntRule(1, 64), "attention heads", shrinks="width")
    head_dim: int = choice(IntRule(4, 256), "query, key and value width of each head", shrinks="width")
    norm: str = choice(OptionRule(NORMS), "normalisation: layer_norm, or SLAB's re-parameterised batch norm (folds away at export)", shrinks="switch")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def simplified_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, head_dim: int, causal: bool) -> torch.Tensor:
    """ReLU-kernel linear attention, normalised. query, key, value: [B, L, H * D] (head-major) -> [B, L, H * D]."""

    def split(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unflatten(-1, (num_heads, head_dim)).transpose(1, 2)

    q, k, v = F.relu(split(query)), F.relu(split(key)), split(value)
    if causal:
        positions = torch.arange(q.shape[2], device=q.device)
        scores = (q @ k.transpose(-2, -1)).masked_fill(positions.unsqueeze(0) > positions.unsqueeze(1), 0.0)
        heads = (scores @ v) / (scores.sum(-1, keepdim=True) + EPS)
    else:
        heads = (q @ (k.transpose(-2, -1) @ v)) / (q @ k.sum(2, keepdim=True).transpose(-2, -1) + EPS)
    return heads.transpose(1, 2).flatten(2)


def value_conv_input(value: torch.Tensor, spatial: tuple[int, int] | None) -> torch.Tensor:
    """value: [B, L, W] -> [B, W, H, W'] for the image convolution, or [B, W, 1, L + 1] (left-padded by one) for the
    causal band."""
    channels = value.transpose(1, 2)
    if spatial is not None:
        return channels.unflatten(-1, spatial)
    return F.pad(channels.unsqueeze(2), (VALUE_KERNEL // 2, 0))


def value_conv_output(conv_out: torch.Tensor, length: int) -> torch.Tensor:
    """Back to tokens [B, L, W], keeping only the causal outputs of a band convolution."""
    return conv_out.flatten(2)[..., :length].transpose(1, 2)


class SimplifiedLinearAttention(nn.Module):
    """Static SLA token mixer. x: [B, L, C] (with ``spatial`` = (H, W) for images, L = H * W) -> [B, L, C]."""

    def __init__(self, config: SLAConfig, context: BlockContext) -> None:
        super().__init__()
        channels, width = context.in_channels, config.num_heads * config.head_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.causal = context.modality == "sequence" and context.causal
        self.query = nn.Linear(channels, width)
        self.key = nn.Linear(channels, width)
        self.value = nn.Linear(channels, width)
        shape = (VALUE_KERNEL, VALUE_KERNEL) if context.modality == "image" else (1, VALUE_KERNEL)
        self.value_conv = nn.Conv2d(width, width, shape, padding=(shape[0] // 2, shape[1] // 2), groups=width)
        self.output = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, spatial: tuple[int, int] | None = None) -> torch.Tensor:
        value = self.value(x)
        heads = simplified_linear_attention(self.query(x), self.key(x), value, self.num_heads, self.head_dim, self.causal)
        local = value_conv_output(self.value_conv(value_conv_input(value, spatial)), x.shape[1])
        return self.output(heads + local)


def _tokens(x: torch.Tensor, modality: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
    if modality == "sequence":
        return x, None
    return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


def _untokens(tokens: torch.Tensor, like: torch.Tensor, modality: str) -> torch.Tensor:
    return tokens if modality == "sequence" else tokens.transpose(1, 2).reshape(like.shape)


class SLABlock(nn.Module):
    """Static SLAB block. image: x: [B, C, H, W] -> same shape; sequence: x: [B, L, C] -> same shape.

    ``norm1`` / ``norm2`` are LayerNorms for ``norm: layer_norm`` and absent for ``repbn`` (folded into the next
    layers at extraction).
    """

    def __init__(self, config: SLAConfig, context: BlockContext) -> None:
        super().__init__()
        check_width_preserving("sla", context)
        channels = context.in_channels
        self.modality = context.modality
        self.norm1 = nn.LayerNorm(channels) if config.norm == "layer_norm" else None
        self.token_mixer = SimplifiedLinearAttention(config, context)
        self.norm2 = nn.LayerNorm(channels) if config.norm == "layer_norm" else None
        self.ffn = FeedForward(config, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, spatial = _tokens(x, self.modality)
        mixed = self.norm1(tokens) if self.norm1 is not None else tokens
        tokens = tokens + self.token_mixer(mixed, spatial)
        fed = self.norm2(tokens) if self.norm2 is not None else tokens
        return _untokens(tokens + self.ffn(fed), x, self.modality)


class ElasticRepBatchNorm(nn.Module):
    """SLAB's re-parameterised batch norm over tokens, ``BN(x) + eta * x``, elastic in its channels.

    x: [B, L, channels] -> same shape (the statistics are per channel over batch and tokens).
    """

    def __init__(self, max_channels: int) -> None:
        super().__init__()
        self.norm = ElasticBatchNorm2d(max_channels)
        self.eta = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return self.norm(x.transpose(1, 2), channels).transpose(1, 2) + self.eta * x

    def affine(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` of the eval-mode map ``x -> scale * x + shift`` for the leading ``channels``."""
        norm = self.norm
        scale = norm.weight[:channels] / torch.sqrt(norm.running_var[:channels] + norm.eps)
        shift = norm.bias[:channels] - norm.running_mean[:channels] * scale
        return scale + self.eta, shift


def fold_affine(linear: nn.Linear, scale: torch.Tensor, shift: torch.Tensor) -> nn.Linear:
    """``linear`` reading ``scale * x + shift`` instead of ``x``: ``W diag(scale)`` and ``b + W shift``, in place."""
    if linear.bias is None:
        raise ValueError("folding a batch norm needs a linear layer with a bias")
    with torch.no_grad():
        linear.bias.add_(linear.weight @ shift)
        linear.weight.mul_(scale.unsqueeze(0))
    return linear


@register_block("sla", config=SLAConfig, static=SLABlock, modalities=("image", "sequence"), reshapes=False)
class ElasticSLABlock(ElasticBlock):
    """Elastic SLAB block: heads, head_dim, norm and the FFN fields are elastic (see the module docstring)."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        check_width_preserving(self.block_type, context)
        channels = context.in_channels
        self.max_heads = max(choices["num_heads"])
        self.max_head_dim = max(choices["head_dim"])
        self.causal = context.modality == "sequence" and context.causal
        width = self.max_heads * self.max_head_dim
        norms = choices["norm"]
        self.layer_norms = nn.ModuleList([ElasticLayerNorm(channels), ElasticLayerNorm(channels)]) if "layer_norm" in norms else None
        self.rep_norms = nn.ModuleList([ElasticRepBatchNorm(channels), ElasticRepBatchNorm(channels)]) if "repbn" in norms else None
        self.query = ElasticLinear(channels, width)
        self.key = ElasticLinear(channels, width)
        self.value = ElasticLinear(channels, width)
        band = "square" if context.modality == "image" else "horizontal"
        self.value_conv = ElasticConv2d(width, width, (VALUE_KERNEL,), depthwise=True, bias=True, band=band)
        self.output = ElasticLinear(width, channels)
        self.ffn = ElasticFeedForward(channels, choices)

    def _rows(self, device: torch.device) -> torch.Tensor:
        return head_rows(self.config.num_heads, self.config.head_dim, self.max_head_dim, device)

    def _norm(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.norm == "layer_norm":
            assert self.layer_norms is not None, "set_active admits layer_norm only when it is among the choices"
            return cast(ElasticLayerNorm, self.layer_norms[index])(tokens, self.in_channels)
        assert self.rep_norms is not None, "set_active admits repbn only when it is among the choices"
        return cast(ElasticRepBatchNorm, self.rep_norms[index])(tokens, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image: x: [B, in_channels, H, W] -> same shape; sequence: x: [B, L, in_channels] -> same shape."""
        config, channels = self.config, self.in_channels
        tokens, spatial = _tokens(x, self.context.modality)
        mixed = self._norm(0, tokens)
        rows = self._rows(x.device)
        value = self.value(mixed, channels, rows)
        heads = simplified_linear_attention(
            self.query(mixed, channels, rows), self.key(mixed, channels, rows), value, config.num_heads, config.head_dim, self.causal
        )
        local = value_conv_output(self.value_conv(value_conv_input(value, spatial), rows.numel(), rows, VALUE_KERNEL), tokens.shape[1])
        tokens = tokens + self.output(heads + local, rows, channels)
        tokens = tokens + self.ffn(self._norm(1, tokens), config, channels)
        return _untokens(tokens, x, self.context.modality)

    def reorder_channels(self) -> None:
        """Sort the heads by the L1 norm of the output projection's columns on them; inside each head, the query/key
        dims together (every score is kept) by their rows' L1 norm, the value dims (with their convolution) by the
        output projection's columns. Then the FFN's hidden units."""
        _, key_rows, value_rows = attention_orders(self.query.weight, self.key.weight, self.output.weight, self.max_heads, self.max_head_dim)
        self.query.permute_(out_order=key_rows)
        self.key.permute_(out_order=key_rows)
        self.value.permute_(out_order=value_rows)
        self.value_conv.permute_(out_order=value_rows)
        self.output.permute_(in_order=value_rows)
        self.ffn.reorder_channels()

    def extract(self) -> nn.Module:
        """A static ``SLABlock`` with copies of the active weights; a ``repbn`` norm is folded into the next layers."""
        config, channels = self.config, self.in_channels
        rows = self._rows(self.query.weight.device)
        mixer = {
            "query": self.query.export(channels, rows),
            "key": self.key.export(channels, rows),
            "value": self.value.export(channels, rows),
            "value_conv": self.value_conv.export(rows.numel(), rows, VALUE_KERNEL),
            "output": self.output.export(rows, channels),
        }
        ffn = self.ffn.export_layers(config, channels)
        layers: dict[str, nn.Module] = {f"token_mixer.{name}": layer for name, layer in mixer.items()}
        layers.update({f"ffn.{name}": layer for name, layer in ffn.items()})
        if config.norm == "layer_norm":
            assert self.layer_norms is not None, "set_active admits layer_norm only when it is among the choices"
            layers["norm1"] = cast(ElasticLayerNorm, self.layer_norms[0]).export(channels)
            layers["norm2"] = cast(ElasticLayerNorm, self.layer_norms[1]).export(channels)
        else:
            assert self.rep_norms is not None, "set_active admits repbn only when it is among the choices"
            with torch.no_grad():
                scale, shift = cast(ElasticRepBatchNorm, self.rep_norms[0]).affine(channels)
                for name in ("query", "key", "value"):
                    fold_affine(cast(nn.Linear, mixer[name]), scale, shift)
                scale, shift = cast(ElasticRepBatchNorm, self.rep_norms[1]).affine(channels)
                for name in ("up", "gate"):
                    if name in ffn:
                        fold_affine(cast(nn.Linear, ffn[name]), scale, shift)
        return self.build_static(layers)


__all__ = [
    "NORMS",
    "ElasticRepBatchNorm",
    "ElasticSLABlock",
    "SLABlock",
    "SLAConfig",
    "SimplifiedLinearAttention",
    "fold_affine",
    "simplified_linear_attention",
]
