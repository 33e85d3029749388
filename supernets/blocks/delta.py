"""The delta-rule block: a MetaFormer block whose token mixer is the gated delta rule with Householder products.

One block covers Gated DeltaNet (Yang et al. 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule"), Kimi
Delta Attention (Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture"; ``gate:
channel``), DeltaProduct (Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via Householder
Products"; ``householder_steps`` = n_h) and negative eigenvalues (Grazzi et al. 2024, "Unlocking State-Tracking in
Linear RNNs Through Negative Eigenvalues"; ``negative_eigenvalues``: ``beta`` in ``(0, 2)``).

Layer layout (always causal), for x: [B, L, C], heads H, per-head width K (keys and values), n_h steps per token:

* ``query`` (C -> H * K), ``key`` and ``value`` (C -> H * n_h * K, laid out ``[head, step, dim]``), no bias;
* ``query_conv``, ``key_conv``, ``value_conv``: causal depthwise convolutions over time (kernel 4, no bias, the
  papers' short convolution), then SiLU; queries and keys are L2-normalised per head and step;
* ``beta`` (C -> H * n_h, no bias): ``beta = sigmoid(x W_beta)``, times 2 with ``negative_eigenvalues``;
* decay through a rank-16 projection as in GLA, ``g = logsigmoid(x W_down W_up + b) / 16``, ``forget_up``
  (16 -> H, one decay per head, Gated DeltaNet) or (16 -> H * K, one per key channel, KDA);
* ``o = delta_rule(q, k, v, beta, g)`` per head (``nas.kernels.delta``, the chunkwise reference on CPU and in ONNX
  export): per token ``S <- diag(exp(g_t)) S``, then for ``j = 1..n_h``
  ``S <- (I - beta_{t,j} k_{t,j} k_{t,j}^T) S + beta_{t,j} k_{t,j} v_{t,j}^T``, and ``o_t = K^-1/2 S^T q_t``;
* per-head LayerNorm over K with one affine shared by all heads (as in GLA), output gate ``o * silu(x W_r + b_r)``
  (C -> H * K) and ``output`` (H * K -> C, no bias).

Elastic: heads (leading heads), head_dim (leading dims of each head, for every step), householder_steps (leading
steps of each head's key, value and beta rows), negative_eigenvalues and gate are switches. When ``channel`` is among
the gate choices the elastic decay projection holds H * K rows and the per-head decay of head h is row 0 of head h
(the first key channel's row), so both gate kinds share weights; otherwise it holds H rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nas.kernels.delta import delta_rule

from ..elastic import ElasticLayerNorm, ElasticLinear, head_major_order, head_rows, importance_order
from .base import BlockChoices, BlockContext, BoolRule, IntRule, OptionRule, choice, register_block
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
CONV_KERNEL_SIZE = 4
CHUNK_SIZE = 16
GATE_KINDS = ("scalar", "channel")


@dataclass(frozen=True, slots=True)
class DeltaNetConfig:
    """Gated delta-rule token mixer (Gated DeltaNet / KDA / DeltaProduct), then a feed-forward network."""

    num_heads: int = choice(IntRule(1, 64), "heads", shrinks="width")
    head_dim: int = choice(IntRule(4, 256), "key and value width of each head (its state is head_dim x head_dim)", shrinks="width")
    householder_steps: int = choice(IntRule(1, 4), "delta-rule (Householder) steps per token, DeltaProduct's n_h", shrinks="width")
    negative_eigenvalues: bool = choice(BoolRule(), "beta in (0, 2) instead of (0, 1): transition eigenvalues in [-1, 1]", shrinks="switch")
    gate: str = choice(OptionRule(GATE_KINDS), "decay per head (scalar, Gated DeltaNet) or per key channel (channel, KDA)", shrinks="switch")
    ffn: str = ffn_field()
    mlp_ratio: float = mlp_ratio_field()
    activation: str = activation_field()


def step_rows(num_heads: int, steps: int, dim: int, max_steps: int, max_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows of the first ``steps`` steps and ``dim`` dims of the first ``num_heads`` heads of a projection laid out
    ``[max_heads, max_steps, max_dim]``."""
    per_head = head_rows(steps, dim, max_dim, device)
    return (torch.arange(num_heads, device=device).unsqueeze(1) * (max_steps * max_dim) + per_head.unsqueeze(0)).reshape(-1)


class CausalDepthwiseConv(nn.Conv1d):
    """Causal depthwise convolution over time: left zero padding of ``(kernel_size - 1) * dilation``.

    x: [B, L, channels] -> [B, L, channels]; output t sees inputs t - (kernel_size - 1) * dilation, ..., t (every
    ``dilation``-th); the last tap multiplies input t.
    """

    def __init__(self, channels: int, kernel_size: int = CONV_KERNEL_SIZE, dilation: int = 1, bias: bool = False) -> None:
        super().__init__(channels, channels, kernel_size, dilation=dilation, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = (self.kernel_size[0] - 1) * self.dilation[0]
        return super().forward(F.pad(x.transpose(1, 2), (left, 0))).transpose(1, 2)


class ElasticCausalDepthwiseConv(nn.Module):
    """``CausalDepthwiseConv`` with elastic channels and kernel size.

    Channels are a count (the leading channels) or an index tensor of rows: the channels that follow a head-major
    projection are nested ``[head, step, dim]`` rows, which ``ElasticConv2d`` (leading channels, centred symmetric
    kernels) cannot select. A depthwise filter acts on its own channel alone, so selecting rows is exact. A smaller
    kernel keeps the *trailing* taps of the largest one: tap ``i`` from the end always weighs the input ``i *
    dilation`` steps back, whatever the kernel size, which is the causal counterpart of a centred kernel.
    """

    def __init__(self, max_channels: int, kernel_sizes: tuple[int, ...] = (CONV_KERNEL_SIZE,), dilation: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.kernel_sizes = tuple(sorted(set(kernel_sizes), reverse=True))
        self.max_kernel_size = self.kernel_sizes[0]
        self.dilation = dilation
        conv = nn.Conv1d(max_channels, max_channels, self.max_kernel_size, groups=max_channels, bias=bias)
        self.weight = conv.weight
        self.bias = conv.bias

    def active(self, channels: int | torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The active ``(weight [channels, 1, kernel_size], bias [channels] or None)``."""
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel_size must be one of {sorted(self.kernel_sizes)}, got {kernel_size}")

        def select(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.narrow(0, 0, channels) if isinstance(channels, int) else tensor.index_select(0, channels)

        weight = select(self.weight)[..., self.max_kernel_size - kernel_size :]
        return weight, None if self.bias is None else select(self.bias)

    def forward(self, x: torch.Tensor, channels: int | torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
        """x: [B, L, channels] -> same shape."""
        kernel_size = self.max_kernel_size if kernel_size is None else kernel_size
        weight, bias = self.active(channels, kernel_size)
        padded = F.pad(x.transpose(1, 2), ((kernel_size - 1) * self.dilation, 0))
        return F.conv1d(padded, weight, bias, dilation=self.dilation, groups=weight.shape[0]).transpose(1, 2)

    @torch.no_grad()
    def permute_(self, order: torch.Tensor) -> None:
        """Reorder the channels (filters and bias) by ``order`` in place."""
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                tensor.copy_(tensor.index_select(0, order.to(tensor.device)))

    def export(self, channels: int | torch.Tensor, kernel_size: int | None = None) -> CausalDepthwiseConv:
        """A static ``CausalDepthwiseConv`` equal to the active choice."""
        kernel_size = self.max_kernel_size if kernel_size is None else kernel_size
        weight, bias = self.active(channels, kernel_size)
        conv = CausalDepthwiseConv(weight.shape[0], kernel_size, self.dilation, bias=bias is not None)
        with torch.no_grad():
            conv.load_state_dict({"weight": weight} if bias is None else {"weight": weight, "bias": bias})
        return conv


def delta_mix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    beta: torch.Tensor,
    forget: torch.Tensor,
    output_gate: torch.Tensor,
    config: DeltaNetConfig,
    head_norm: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The delta-rule layer between its convolutions and its output projection.

    query, output_gate: [B, L, H * K]; key, value: [B, L, H * n_h * K] (after convolution and SiLU); beta: [B, L,
    H * n_h] (logits); forget: [B, L, H] or [B, L, H * K] (decay logits); head_norm: [B, L, H, K] -> same shape.
    Returns [B, L, H * K].
    """
    heads, dim, steps = config.num_heads, config.head_dim, config.householder_steps
    q = F.normalize(query.unflatten(-1, (heads, dim)), dim=-1).transpose(1, 2)
    k = F.normalize(key.unflatten(-1, (heads, steps, dim)), dim=-1).transpose(1, 2)
    v = value.unflatten(-1, (heads, steps, dim)).transpose(1, 2)
    step_size = torch.sigmoid(beta).unflatten(-1, (heads, steps)).transpose(1, 2)
    if config.negative_eigenvalues:
        step_size = 2.0 * step_size
    # logsigmoid(x) written as -softplus(-x): ONNX exports logsigmoid as Log(Sigmoid(x)), which is -inf for x < -20.
    log_decay = -F.softplus(-forget) / GATE_TEMPERATURE
    log_decay = log_decay.transpose(1, 2) if config.gate == "scalar" else log_decay.unflatten(-1, (heads, dim)).transpose(1, 2)
    o, _ = delta_rule(q, k, v, step_size, log_decay, chunk_size=CHUNK_SIZE)
    return head_norm(o.transpose(1, 2)).flatten(2) * F.silu(output_gate)


def gate_width(config: DeltaNetConfig) -> int:
    """Outputs of the decay projection: one per head (scalar) or one per head and key channel (channel)."""
    return config.num_heads * (config.head_dim if config.gate == "channel" else 1)


class DeltaRuleLayer(nn.Module):
    """Static delta-rule token mixer (see the module docstring). x: [B, L, C] -> [B, L, C]."""

    def __init__(self, config: DeltaNetConfig, context: BlockContext) -> None:
        super().__init__()
        channels = context.in_channels
        width = config.num_heads * config.head_dim
        step_width = width * config.householder_steps
        self.config = config
        self.query = nn.Linear(channels, width, bias=False)
        self.key = nn.Linear(channels, step_width, bias=False)
        self.value = nn.Linear(channels, step_width, bias=False)
        self.query_conv = CausalDepthwiseConv(width)
        self.key_conv = CausalDepthwiseConv(step_width)
        self.value_conv = CausalDepthwiseConv(step_width)
        self.beta = nn.Linear(channels, config.num_heads * config.householder_steps, bias=False)
        self.forget_down = nn.Linear(channels, GATE_RANK, bias=False)
        self.forget_up = nn.Linear(GATE_RANK, gate_width(config))
        self.output_gate = nn.Linear(channels, width)
        self.head_norm = nn.LayerNorm(config.head_dim)
        self.output = nn.Linear(width, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = delta_mix(
            F.silu(self.query_conv(self.query(x))),
            F.silu(self.key_conv(self.key(x))),
            F.silu(self.value_conv(self.value(x))),
            self.beta(x),
            self.forget_up(self.forget_down(x)),
            self.output_gate(x),
            self.config,
            self.head_norm,
        )
        return self.output(heads)


class ElasticDeltaRuleLayer(ElasticTokenMixer):
    """Delta-rule token mixer with elastic width, heads, head_dim and householder_steps, and switchable
    negative_eigenvalues and gate kind."""

    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        channels = context.in_channels
        self.max_heads = max(choices["num_heads"])
        self.max_head_dim = max(choices["head_dim"])
        self.max_steps = max(choices["householder_steps"])
        width = self.max_heads * self.max_head_dim
        step_width = width * self.max_steps
        self.query = ElasticLinear(channels, width, bias=False)
        self.key = ElasticLinear(channels, step_width, bias=False)
        self.value = ElasticLinear(channels, step_width, bias=False)
        self.query_conv = ElasticCausalDepthwiseConv(width)
        self.key_conv = ElasticCausalDepthwiseConv(step_width)
        self.value_conv = ElasticCausalDepthwiseConv(step_width)
        self.beta = ElasticLinear(channels, self.max_heads * self.max_steps, bias=False)
        self.forget_down = ElasticLinear(channels, GATE_RANK, bias=False)
        self.gate_dim = self.max_head_dim if "channel" in choices["gate"] else 1
        self.forget_up = ElasticLinear(GATE_RANK, self.max_heads * self.gate_dim)
        self.output_gate = ElasticLinear(channels, width)
        self.head_norm = ElasticLayerNorm(self.max_head_dim)
        self.output = ElasticLinear(width, channels, bias=False)

    def _rows(self, config: DeltaNetConfig, device: torch.device) -> dict[str, torch.Tensor]:
        """Rows of the active features inside the largest layouts: per head (``head``), per head and step
        (``step``), one per head and step (``beta``) and the decay projection's (``gate``)."""
        heads, dim, steps = config.num_heads, config.head_dim, config.householder_steps
        head = head_rows(heads, dim, self.max_head_dim, device)
        return {
            "head": head,
            "step": step_rows(heads, steps, dim, self.max_steps, self.max_head_dim, device),
            "beta": head_rows(heads, steps, self.max_steps, device),
            "gate": head if config.gate == "channel" else head_rows(heads, 1, self.gate_dim, device),
        }

    def forward(self, x: torch.Tensor, config: DeltaNetConfig, channels: int) -> torch.Tensor:
        """x: [B, L, channels] -> [B, L, channels]."""
        rows = self._rows(config, x.device)
        heads = delta_mix(
            F.silu(self.query_conv(self.query(x, channels, rows["head"]), rows["head"])),
            F.silu(self.key_conv(self.key(x, channels, rows["step"]), rows["step"])),
            F.silu(self.value_conv(self.value(x, channels, rows["step"]), rows["step"])),
            self.beta(x, channels, rows["beta"]),
            self.forget_up(self.forget_down(x, channels, GATE_RANK), GATE_RANK, rows["gate"]),
            self.output_gate(x, channels, rows["head"]),
            config,
            lambda heads: self.head_norm(heads, config.head_dim),
        )
        return self.output(heads, rows["head"], channels)

    def reorder_channels(self) -> None:
        """Sort the heads by the L1 norm of the output projection's columns on them; every per-head row (queries,
        keys, values and their convolutions, beta, decay, output gate) moves with its head. Dims inside a head keep
        their order: the per-head decay reads each head's first key channel and the head norm's affine is shared by
        every head, so reordering dims would change the largest choice's function."""
        heads, dim, steps = self.max_heads, self.max_head_dim, self.max_steps
        output = self.output.weight.detach().abs()
        head_order = importance_order(output.reshape(-1, heads, dim).sum(dim=2), 1)
        head = head_major_order(head_order, None, dim)
        step = head_major_order(head_order, None, steps * dim)
        self.query.permute_(out_order=head)
        self.query_conv.permute_(head)
        self.key.permute_(out_order=step)
        self.key_conv.permute_(step)
        self.value.permute_(out_order=step)
        self.value_conv.permute_(step)
        self.beta.permute_(out_order=head_major_order(head_order, None, steps))
        self.forget_up.permute_(out_order=head_major_order(head_order, None, self.gate_dim))
        self.output_gate.permute_(out_order=head)
        self.output.permute_(in_order=head)

    def export_layers(self, config: DeltaNetConfig, channels: int) -> dict[str, nn.Module]:
        rows = self._rows(config, self.query.weight.device)
        return {
            "query": self.query.export(channels, rows["head"]),
            "key": self.key.export(channels, rows["step"]),
            "value": self.value.export(channels, rows["step"]),
            "query_conv": self.query_conv.export(rows["head"]),
            "key_conv": self.key_conv.export(rows["step"]),
            "value_conv": self.value_conv.export(rows["step"]),
            "beta": self.beta.export(channels, rows["beta"]),
            "forget_down": self.forget_down.export(channels, GATE_RANK),
            "forget_up": self.forget_up.export(GATE_RANK, rows["gate"]),
            "output_gate": self.output_gate.export(channels, rows["head"]),
            "head_norm": self.head_norm.export(config.head_dim),
            "output": self.output.export(rows["head"], channels),
        }


class DeltaNet(MetaFormerBlock):
    """Static delta-rule block (see ``DeltaRuleLayer``)."""

    token_mixer_class = DeltaRuleLayer


@register_block("delta_net", config=DeltaNetConfig, static=DeltaNet, modalities=("sequence",), reshapes=False)
class ElasticDeltaNet(ElasticMetaFormerBlock):
    """Elastic delta-rule block: heads, head_dim, householder_steps, the two switches and the FFN fields."""

    token_mixer_class = ElasticDeltaRuleLayer


__all__ = [
    "CHUNK_SIZE",
    "CONV_KERNEL_SIZE",
    "GATE_KINDS",
    "GATE_RANK",
    "GATE_TEMPERATURE",
    "CausalDepthwiseConv",
    "DeltaNet",
    "DeltaNetConfig",
    "DeltaRuleLayer",
    "ElasticCausalDepthwiseConv",
    "ElasticDeltaNet",
    "ElasticDeltaRuleLayer",
    "delta_mix",
    "gate_width",
    "step_rows",
]
