"""MetaFormer blocks: ``x + token_mixer(norm1(x))`` then ``x + ffn(norm2(x))``, and the gated attention block.

The skeleton (elastic and static), the shared feed-forward network (``ffn: mlp | glu``) and its config fields live
here; each token mixer (gated attention here, gated linear attention in ``gla.py``) only adds its own projections.

MetaFormer blocks preserve width: the supernet gives them ``in_channels == out_channels`` and stride 1 (they are
registered with ``reshapes=False``). On images they flatten ``[B, C, H, W]`` to tokens ``[B, H * W, C]`` and back;
on sequences they take ``[B, L, C]`` as is.

Layer layout (shared by the elastic block and its static twin, so that state-dict keys match):

* ``norm1``, ``norm2``: LayerNorm over channels;
* ``token_mixer``: see the mixer classes;
* ``ffn``: ``up`` (C -> hidden), ``gate`` (C -> hidden, ``glu`` only), ``squeeze`` (hidden -> C) and ``expand``
  (C -> hidden, ``hourglass`` only), ``down`` (hidden -> C), all with bias, ``hidden = hidden_channels(C, mlp_ratio)``:

  * ``mlp`` computes ``down(act(up(x)))`` (the Transformer FFN);
  * ``glu`` computes ``down(act(gate(x)) * up(x))`` (Activator, Shazeer's GLU variants);
  * ``hourglass`` lifts to the wide width, runs a residual step through a bottleneck of the block width and projects
    back: ``z = up(x)``, ``z = z + expand(act(squeeze(z)))``, ``down(z)`` ("Rethinking the shape convention of an
    MLP", 2025: the skip connection at the expanded width, the residual computation through the narrow one). Both
    widths are elastic: the skip width through ``mlp_ratio``, the bottleneck through the block width.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..elastic import ElasticLayerNorm, ElasticLinear, attention_orders, head_rows, importance_order
from ..layers import hidden_channels, make_activation
from .base import (
    BlockChoices,
    BlockContext,
    BoolRule,
    ElasticBlock,
    FloatRule,
    IntRule,
    OptionRule,
    choice,
    register_block,
)

FFN_KINDS = ("glu", "mlp", "hourglass")
FFN_ACTIVATIONS = ("gelu", "silu", "relu")
FFN_FIELD_NAMES = ("ffn", "mlp_ratio", "activation")


def ffn_field() -> Any:
    """The ``ffn`` field shared by every MetaFormer config (declare it after the token mixer's fields)."""
    return choice(
        OptionRule(FFN_KINDS),
        "feed-forward network: gated (glu), plain two-layer (mlp) or wide-narrow-wide with its skip at the wide width (hourglass)",
        shrinks="switch",
    )


def mlp_ratio_field() -> Any:
    """The ``mlp_ratio`` field shared by every MetaFormer config."""
    return choice(FloatRule(0.5, 8), "feed-forward hidden width as a multiple of the block width", shrinks="width")


def activation_field() -> Any:
    """The ``activation`` field shared by every MetaFormer config."""
    return choice(OptionRule(FFN_ACTIVATIONS), "activation of the feed-forward network", shrinks="switch")


class FFNSettings(Protocol):
    """What the feed-forward network reads from a MetaFormer config."""

    @property
    def ffn(self) -> str: ...

    @property
    def mlp_ratio(self) -> float: ...

    @property
    def activation(self) -> str: ...


def apply_to_tokens(x: torch.Tensor, modality: str, function: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``function`` on the tokens of ``x``.

    image: x: [B, C, H, W] -> tokens [B, H * W, C] -> back to [B, C, H, W]; sequence: x: [B, L, C] as is.
    """
    if modality == "sequence":
        return function(x)
    tokens = function(x.flatten(2).transpose(1, 2))
    return tokens.transpose(1, 2).reshape(x.shape)


def prefixed(prefix: str, layers: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``layers`` with their names put under ``prefix``."""
    return {f"{prefix}.{name}": layer for name, layer in layers.items()}


def check_width_preserving(name: str, context: BlockContext) -> None:
    """MetaFormer blocks keep their width and resolution; raise ``ValueError`` otherwise."""
    if context.in_channels != context.out_channels or context.stride != 1:
        raise ValueError(
            f"{name} keeps width and resolution: in_channels must equal out_channels and stride must be 1, "
            f"got in_channels={context.in_channels}, out_channels={context.out_channels}, stride={context.stride}"
        )


class FeedForward(nn.Module):
    """Static feed-forward network. x: [..., channels] -> [..., channels]."""

    def __init__(self, config: FFNSettings, channels: int) -> None:
        super().__init__()
        hidden = hidden_channels(channels, config.mlp_ratio)
        self.up = nn.Linear(channels, hidden)
        self.gate = nn.Linear(channels, hidden) if config.ffn == "glu" else None
        self.squeeze = nn.Linear(hidden, channels) if config.ffn == "hourglass" else None
        self.expand = nn.Linear(channels, hidden) if config.ffn == "hourglass" else None
        self.activation = make_activation(config.activation)
        self.down = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(self.activation(self.gate(x)) * self.up(x))
        if self.squeeze is not None and self.expand is not None:
            wide = self.up(x)
            return self.down(wide + self.expand(self.activation(self.squeeze(wide))))
        return self.down(self.activation(self.up(x)))


class ElasticFeedForward(nn.Module):
    """Feed-forward network with elastic width, hidden width (``mlp_ratio``), kind and activation.

    The ``gate`` projection exists only when ``glu`` is among the choices, ``squeeze`` and ``expand`` only when
    ``hourglass`` is.
    """

    def __init__(self, max_channels: int, choices: BlockChoices) -> None:
        super().__init__()
        max_hidden = hidden_channels(max_channels, max(choices["mlp_ratio"]))
        self.up = ElasticLinear(max_channels, max_hidden)
        self.gate = ElasticLinear(max_channels, max_hidden) if "glu" in choices["ffn"] else None
        hourglass = "hourglass" in choices["ffn"]
        self.squeeze = ElasticLinear(max_hidden, max_channels) if hourglass else None
        self.expand = ElasticLinear(max_channels, max_hidden) if hourglass else None
        self.activations = nn.ModuleDict({name: make_activation(name) for name in choices["activation"]})
        self.down = ElasticLinear(max_hidden, max_channels)

    def forward(self, x: torch.Tensor, config: FFNSettings, channels: int) -> torch.Tensor:
        """x: [..., channels] -> [..., channels]."""
        hidden = hidden_channels(channels, config.mlp_ratio)
        activation = self.activations[config.activation]
        up = self.up(x, channels, hidden)
        if config.ffn == "mlp":
            return self.down(activation(up), hidden, channels)
        if config.ffn == "hourglass":
            assert self.squeeze is not None and self.expand is not None, "set_active admits hourglass only when it is among the choices"
            wide = up + self.expand(activation(self.squeeze(up, hidden, channels)), channels, hidden)
            return self.down(wide, hidden, channels)
        assert self.gate is not None, "set_active admits glu only when it is among the choices"
        return self.down(activation(self.gate(x, channels, hidden)) * up, hidden, channels)

    def reorder_channels(self) -> None:
        """Sort the hidden units by the L1 norm of the down projection's weights on them; up and gate rows move
        with them, and so do the hourglass bottleneck's columns (``squeeze``) and rows (``expand``). The output is
        unchanged at the largest choice (a permutation of the wide units commutes with everything the FFN does)."""
        order = importance_order(self.down.weight, 1)
        self.up.permute_(out_order=order)
        if self.gate is not None:
            self.gate.permute_(out_order=order)
        if self.squeeze is not None and self.expand is not None:
            self.squeeze.permute_(in_order=order)
            self.expand.permute_(out_order=order)
        self.down.permute_(in_order=order)

    def export_layers(self, config: FFNSettings, channels: int) -> dict[str, nn.Module]:
        """The static layers of the active choice, named as in ``FeedForward``."""
        hidden = hidden_channels(channels, config.mlp_ratio)
        layers: dict[str, nn.Module] = {"up": self.up.export(channels, hidden), "down": self.down.export(hidden, channels)}
        if config.ffn == "glu":
            assert self.gate is not None, "set_active admits glu only when it is among the choices"
            layers["gate"] = self.gate.export(channels, hidden)
        if config.ffn == "hourglass":
            assert self.squeeze is not None and self.expand is not None, "set_active admits hourglass only when it is among the choices"
            layers["squeeze"] = self.squeeze.export(hidden, channels)
            layers["expand"] = self.expand.export(channels, hidden)
        return layers


class ElasticTokenMixer(nn.Module, ABC):
    """An elastic token mixer: built for the largest choice, run and exported for the active one.

    Subclasses build their weights from ``context`` (largest width) and ``choices`` (largest value of each field).
    """

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__()

    @abstractmethod
    def forward(self, x: torch.Tensor, config: Any, channels: int) -> torch.Tensor:
        """x: [B, L, channels] -> [B, L, channels]."""

    @abstractmethod
    def export_layers(self, config: Any, channels: int) -> dict[str, nn.Module]:
        """The static layers of the active choice, named as in the static mixer."""

    def reorder_channels(self) -> None:
        """See ``ElasticBlock.reorder_channels``; by default the mixer keeps its order."""


class MetaFormerBlock(nn.Module):
    """Static MetaFormer block. image: x: [B, C, H, W] -> same shape; sequence: x: [B, L, C] -> same shape.

    Subclasses set ``token_mixer_class``, constructed as ``token_mixer_class(config, context)``.
    """

    token_mixer_class: ClassVar[type[nn.Module]]

    def __init__(self, config: Any, context: BlockContext) -> None:
        super().__init__()
        check_width_preserving(type(self).__name__, context)
        self.config = config
        self.modality = context.modality
        channels = context.in_channels
        self.norm1 = nn.LayerNorm(channels)
        self.token_mixer = self.token_mixer_class(config, context)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = FeedForward(config, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_to_tokens(x, self.modality, self._mix)

    def _mix(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.token_mixer(self.norm1(tokens))
        return tokens + self.ffn(self.norm2(tokens))


class ElasticMetaFormerBlock(ElasticBlock):
    """Elastic MetaFormer block: elastic width, token mixer and feed-forward network.

    Subclasses set ``token_mixer_class`` (an ``ElasticTokenMixer``); the static twin is the class registered
    with the subclass.
    """

    token_mixer_class: ClassVar[type[ElasticTokenMixer]]

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        check_width_preserving(self.block_type, context)
        self.norm1 = ElasticLayerNorm(context.in_channels)
        self.token_mixer = self.token_mixer_class(context, choices)
        self.norm2 = ElasticLayerNorm(context.in_channels)
        self.ffn = ElasticFeedForward(context.in_channels, choices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """image: x: [B, in_channels, H, W] -> same shape; sequence: x: [B, L, in_channels] -> same shape."""
        return apply_to_tokens(x, self.context.modality, self._mix)

    def _mix(self, tokens: torch.Tensor) -> torch.Tensor:
        channels = self.in_channels
        tokens = tokens + self.token_mixer(self.norm1(tokens, channels), self.config, channels)
        return tokens + self.ffn(self.norm2(tokens, channels), self.config, channels)

    def reorder_channels(self) -> None:
        """Reorder the token mixer's heads and the feed-forward network's hidden units by importance."""
        self.token_mixer.reorder_channels()
        self.ffn.reorder_channels()

    def export_layers(self) -> dict[str, nn.Module]:
        """Static layers of the active choice, named as in the static block."""
        channels = self.in_channels
        return {
            "norm1": self.norm1.export(channels),
            **prefixed("token_mixer", self.token_mixer.export_layers(self.config, channels)),
            "norm2": self.norm2.export(channels),
            **prefixed("ffn", self.ffn.export_layers(self.config, channels)),
        }

    def extract(self) -> nn.Module:
        """A freshly built static block holding copies of the active weights (no shared storage)."""
        return self.build_static(self.export_layers())


@dataclass(frozen=True, slots=True)
class GatedAttentionConfig:
    """Multi-head softmax self-attention with a head-wise sigmoid output gate, then a feed-forward network."""

    num_heads: int = choice(IntRule(1, 64), "attention heads", shrinks="width")
    head_dim: int = choice(IntRule(4, 256), "value width of each head (and its query and key width at qk_ratio 1)", shrinks="width")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()
    qk_ratio: float = choice(
        FloatRule(0.125, 1),
        "query and key width of each head as a share of head_dim (LowFormer's slimmed attention: scores cost less, values keep head_dim)",
        shrinks="width",
        default=1.0,
    )
    output_gate: bool = choice(BoolRule(), "the head-wise sigmoid output gate (off: plain multi-head attention)", shrinks="switch", default=True)


def query_key_dim(config: GatedAttentionConfig) -> int:
    """Query and key width of each head: ``round(head_dim * qk_ratio)``, at least 1."""
    return hidden_channels(config.head_dim, config.qk_ratio)


def gated_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate: torch.Tensor | None,
    num_heads: int,
    head_dim: int,
    causal: bool,
    key_dim: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention whose output is scaled per head by ``sigmoid(gate)`` (``gate=None``: no gate).

    query, key: [B, L, num_heads * key_dim]; value: [B, L, num_heads * head_dim] (head-major; ``key_dim`` defaults
    to ``head_dim``); gate: [B, L, num_heads] (logits) -> [B, L, num_heads * head_dim]. Plain matmul + softmax (scale
    ``key_dim ** -0.5``), so it exports to standard ONNX ops.
    """
    key_dim = head_dim if key_dim is None else key_dim

    def split(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor.unflatten(-1, (num_heads, dim)).transpose(1, 2)

    scores = split(query, key_dim) @ split(key, key_dim).transpose(-2, -1) * key_dim**-0.5
    if causal:
        positions = torch.arange(query.shape[1], device=query.device)
        scores = scores.masked_fill(positions.unsqueeze(0) > positions.unsqueeze(1), float("-inf"))
    heads = scores.softmax(dim=-1) @ split(value, head_dim)
    if gate is not None:
        heads = heads * torch.sigmoid(gate).transpose(1, 2).unsqueeze(-1)
    return heads.transpose(1, 2).flatten(2)


class GatedSelfAttention(nn.Module):
    """Static gated self-attention (Qiu et al. 2025, variant G1, head-wise). x: [B, L, C] -> [B, L, C].

    ``query``, ``key``: C -> heads * key_dim (``key_dim = round(head_dim * qk_ratio)``); ``value``: C -> heads *
    head_dim; ``gate`` (when ``output_gate``): C -> heads (one sigmoid gate per head, applied to that head's attention
    output); ``output``: heads * head_dim -> C. All with bias.
    """

    def __init__(self, config: GatedAttentionConfig, context: BlockContext) -> None:
        super().__init__()
        channels, width = context.in_channels, config.num_heads * config.head_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.key_dim = query_key_dim(config)
        self.causal = context.causal
        self.query = nn.Linear(channels, config.num_heads * self.key_dim)
        self.key = nn.Linear(channels, config.num_heads * self.key_dim)
        self.value = nn.Linear(channels, width)
        self.gate = nn.Linear(channels, config.num_heads) if config.output_gate else None
        self.output = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = None if self.gate is None else self.gate(x)
        heads = gated_softmax_attention(self.query(x), self.key(x), self.value(x), gate, self.num_heads, self.head_dim, self.causal, self.key_dim)
        return self.output(heads)


class ElasticGatedSelfAttention(ElasticTokenMixer):
    """Gated self-attention with elastic width, heads (leading heads), head_dim (leading dims of each head), the
    query/key width (leading dims of each head's query and key rows) and the gate (present when on is a choice)."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        self.max_heads = max(choices["num_heads"])
        self.max_head_dim = max(choices["head_dim"])
        self.causal = context.causal
        width = self.max_heads * self.max_head_dim
        self.query = ElasticLinear(channels, width)
        self.key = ElasticLinear(channels, width)
        self.value = ElasticLinear(channels, width)
        self.gate = ElasticLinear(channels, self.max_heads) if True in choices["output_gate"] else None
        self.output = ElasticLinear(width, channels)

    def _rows(self, config: GatedAttentionConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the active query/key and value features inside the largest head-major layout."""
        return (
            head_rows(config.num_heads, query_key_dim(config), self.max_head_dim, device),
            head_rows(config.num_heads, config.head_dim, self.max_head_dim, device),
        )

    def forward(self, x: torch.Tensor, config: GatedAttentionConfig, channels: int) -> torch.Tensor:
        """x: [B, L, channels] -> [B, L, channels]."""
        key_rows, rows = self._rows(config, x.device)
        gate = None
        if config.output_gate:
            assert self.gate is not None, "set_active admits output_gate only when it is among the choices"
            gate = self.gate(x, channels, config.num_heads)
        heads = gated_softmax_attention(
            self.query(x, channels, key_rows),
            self.key(x, channels, key_rows),
            self.value(x, channels, rows),
            gate,
            config.num_heads,
            config.head_dim,
            self.causal,
            query_key_dim(config),
        )
        return self.output(heads, rows, channels)

    def reorder_channels(self) -> None:
        """Sort the heads by the L1 norm of the output projection's columns on them (the gate rows move with the
        heads); inside each head, sort the query/key dims (together, which keeps every score) by the L1 norm of
        their query and key rows, and the value dims by the output projection's columns."""
        head_order, key_rows, value_rows = attention_orders(self.query.weight, self.key.weight, self.output.weight, self.max_heads, self.max_head_dim)
        self.query.permute_(out_order=key_rows)
        self.key.permute_(out_order=key_rows)
        self.value.permute_(out_order=value_rows)
        if self.gate is not None:
            self.gate.permute_(out_order=head_order)
        self.output.permute_(in_order=value_rows)

    def export_layers(self, config: GatedAttentionConfig, channels: int) -> dict[str, nn.Module]:
        key_rows, rows = self._rows(config, self.query.weight.device)
        layers: dict[str, nn.Module] = {
            "query": self.query.export(channels, key_rows),
            "key": self.key.export(channels, key_rows),
            "value": self.value.export(channels, rows),
            "output": self.output.export(rows, channels),
        }
        if config.output_gate:
            assert self.gate is not None, "set_active admits output_gate only when it is among the choices"
            layers["gate"] = self.gate.export(channels, config.num_heads)
        return layers


class GatedAttention(MetaFormerBlock):
    """Static gated attention block (see ``GatedSelfAttention``)."""

    token_mixer_class = GatedSelfAttention


@register_block("gated_attention", config=GatedAttentionConfig, static=GatedAttention, modalities=("image", "sequence"), reshapes=False)
class ElasticGatedAttention(ElasticMetaFormerBlock):
    """Elastic gated attention block: heads, head_dim, qk_ratio, output_gate, ffn kind, mlp_ratio and activation are
    elastic."""

    token_mixer_class = ElasticGatedSelfAttention


__all__ = [
    "FFN_ACTIVATIONS",
    "FFN_FIELD_NAMES",
    "FFN_KINDS",
    "ElasticFeedForward",
    "ElasticGatedAttention",
    "ElasticGatedSelfAttention",
    "ElasticMetaFormerBlock",
    "ElasticTokenMixer",
    "FFNSettings",
    "FeedForward",
    "GatedAttention",
    "GatedAttentionConfig",
    "GatedSelfAttention",
    "MetaFormerBlock",
    "activation_field",
    "apply_to_tokens",
    "ffn_field",
    "gated_softmax_attention",
    "mlp_ratio_field",
    "prefixed",
    "query_key_dim",
]
