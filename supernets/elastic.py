"""Elastic primitives: the only place where shared weights are sliced.

Every primitive holds the weights of its largest choice and is called with the active sizes, which the block
receives from the supernet (never read from ``x.shape``). Slicing rules:

* channels, features and heads: the leading slice (``weight[:out, :in]``);
* kernels: the centred ``k x k`` window, optionally passed through Once-for-All's learned kernel transform
  matrices (7 -> 5 -> 3), which start as the identity;
* per-head sub-dimensions (e.g. key dimension inside each head): an index over ``[heads, max_dim]`` rows.

``export(...)`` returns a static ``torch.nn`` layer with cloned, contiguous weights that shares no storage.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerScale

BANDS = ("square", "horizontal", "vertical")
"""Kernel shapes of ``ElasticConv2d``: ``k x k``, a ``1 x k`` row band, a ``k x 1`` column band (InceptionNeXt)."""


def kernel_shape(kernel_size: int, band: str = "square") -> tuple[int, int]:
    """``(height, width)`` of a ``kernel_size`` kernel of shape ``band`` (one of ``BANDS``)."""
    if band == "horizontal":
        return (1, kernel_size)
    if band == "vertical":
        return (kernel_size, 1)
    return (kernel_size, kernel_size)


def centred_kernel(weight: torch.Tensor, kernel_size: int, band: str = "square") -> torch.Tensor:
    """The centred window of ``weight: [O, I, KH, KW]`` of ``kernel_shape(kernel_size, band)``."""
    height, width = kernel_shape(kernel_size, band)
    top = (weight.shape[-2] - height) // 2
    left = (weight.shape[-1] - width) // 2
    return weight[..., top : top + height, left : left + width]


ActiveWeights = tuple[torch.Tensor, torch.Tensor | None]
"""The active ``(weight, bias or None)`` of an elastic layer."""


def head_rows(num_heads: int, active_dim: int, max_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Row indices of the first ``active_dim`` entries of each of the first ``num_heads`` heads.

    For a projection laid out head-major as ``[max_heads * max_dim, ...]``.
    """
    heads = torch.arange(num_heads, device=device).unsqueeze(1) * max_dim
    return (heads + torch.arange(active_dim, device=device).unsqueeze(0)).reshape(-1)


def importance_order(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices of ``weight``'s slices along ``dim`` by decreasing L1 norm (ties keep their order): the channel
    importance Once-for-All sorts by before shrinking widths."""
    other = [axis for axis in range(weight.ndim) if axis != dim % weight.ndim]
    scores = weight.detach().abs().sum(dim=other) if other else weight.detach().abs()
    return torch.argsort(-scores, stable=True)


def head_major_order(head_order: torch.Tensor, dim_orders: torch.Tensor | None, max_dim: int) -> torch.Tensor:
    """The row permutation of a head-major layout ``[max_heads * max_dim, ...]`` that puts head ``head_order[i]``
    in place ``i`` and, inside each head ``h``, its dims in the order ``dim_orders[h]`` (``[max_heads, max_dim]``;
    None keeps the dims' order)."""
    heads = head_order.shape[0]
    if dim_orders is None:
        dim_orders = torch.arange(max_dim).expand(heads, max_dim)
    return (head_order.unsqueeze(1) * max_dim + dim_orders[head_order]).reshape(-1)


def attention_orders(query: torch.Tensor, key: torch.Tensor, output: torch.Tensor, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance orders of a head-major attention layout (``query``, ``key``: ``[heads * dim, C]``, ``output``:
    ``[C, heads * dim]`` weights): ``(head_order, query_key_rows, value_rows)``. Heads go by the L1 norm of the
    output projection's columns on them; inside each head the query and key dims move together (which keeps every
    score) by the L1 norm of their rows, and the value dims by the output projection's columns."""
    output = output.detach().abs()
    head_order = importance_order(output.reshape(-1, heads, dim).sum(dim=2), 1)
    query_key = (query.detach().abs().sum(1) + key.detach().abs().sum(1)).reshape(heads, dim)
    query_key_rows = head_major_order(head_order, torch.argsort(-query_key, dim=1, stable=True), dim)
    value_rows = head_major_order(head_order, torch.argsort(-output.sum(0).reshape(heads, dim), dim=1, stable=True), dim)
    return head_order, query_key_rows, value_rows


def _permute_(tensor: torch.Tensor | None, order: torch.Tensor | None, dim: int) -> None:
    """Permute ``tensor`` in place along ``dim`` (slice ``i`` becomes the old slice ``order[i]``)."""
    if tensor is not None and order is not None:
        tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))


class _ActiveWeightCache:
    """Keeps the contiguous active weights of the last choice while gradients are off (evaluation, latency
    measurement), so inference on a supernet does not re-slice and re-transform weights on every call. The
    cache is keyed on the choice and on the parameters' version counters, so any update invalidates it."""

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.value: ActiveWeights | None = None

    def get(self, module: nn.Module, choice: Hashable, compute: Callable[[], ActiveWeights]) -> ActiveWeights:
        if torch.is_grad_enabled():
            return compute()
        key = (choice, tuple(parameter._version for parameter in module.parameters()))
        if key != self.key or self.value is None:
            weight, bias = compute()
            self.value = (weight.contiguous(), None if bias is None else bias.contiguous())
            self.key = key
        return self.value


def _selection_key(selection: int | torch.Tensor) -> int | tuple[int, ...]:
    return selection if isinstance(selection, int) else tuple(selection.tolist())


class ElasticConv2d(nn.Module):
    """2D convolution with elastic input/output channels and kernel size.

    Args:
        max_in_channels, max_out_channels: sizes of the largest choice.
        kernel_sizes: the kernel choices; weights are stored for the largest.
        stride: fixed stride.
        depthwise: one filter per channel (``groups = channels``; ``in_channels`` must equal ``out_channels``).
        bias: learnable bias.
        kernel_transform: learn Once-for-All's transform matrices between successive kernel sizes (square only).
        band: ``square`` (``k x k``), ``horizontal`` (``1 x k``) or ``vertical`` (``k x 1``); padding keeps the
            spatial size (``k // 2`` along the kernel's long axes).
    """

    def __init__(
        self,
        max_in_channels: int,
        max_out_channels: int,
        kernel_sizes: tuple[int, ...] = (1,),
        stride: int = 1,
        *,
        depthwise: bool = False,
        bias: bool = False,
        kernel_transform: bool = False,
        band: str = "square",
    ) -> None:
        super().__init__()
        if depthwise and max_in_channels != max_out_channels:
            raise ValueError("a depthwise convolution needs max_in_channels == max_out_channels")
        if band not in BANDS:
            raise ValueError(f"band must be one of {list(BANDS)}, got {band!r}")
        if kernel_transform and band != "square":
            raise ValueError("kernel transforms apply to square kernels only")
        self.band = band
        self.kernel_sizes = tuple(sorted(set(kernel_sizes), reverse=True))
        self.max_kernel_size = self.kernel_sizes[0]
        self.stride = stride
        self.depthwise = depthwise
        in_per_group = 1 if depthwise else max_in_channels
        self.weight = nn.Parameter(torch.empty(max_out_channels, in_per_group, *kernel_shape(self.max_kernel_size, band)))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bias = nn.Parameter(torch.zeros(max_out_channels)) if bias else None
        self.transforms = nn.ParameterDict()
        if kernel_transform:
            for larger, smaller in itertools.pairwise(self.kernel_sizes):
                self.transforms[f"{larger}to{smaller}"] = nn.Parameter(torch.eye(smaller * smaller))
        self._cache = _ActiveWeightCache()

    def active_weight(self, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> torch.Tensor:
        """Weight of the active choice: ``[out, in or 1, kh, kw]`` (``kernel_shape(kernel_size, band)``).

        A depthwise convolution also takes ``out_channels`` as a 1-D index tensor of its channels (e.g. ``head_rows``
        of a head-major layout), ``in_channels`` then being their count."""
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel_size must be one of {sorted(self.kernel_sizes)}, got {kernel_size}")
        if isinstance(out_channels, torch.Tensor):
            if not self.depthwise:
                raise ValueError("only a depthwise convolution selects its channels by index")
            weight = self.weight.index_select(0, out_channels)
        else:
            weight = self.weight[:out_channels] if self.depthwise else self.weight[:out_channels, :in_channels]
        if not self.transforms:
            return centred_kernel(weight, kernel_size, self.band)
        current = self.max_kernel_size
        for smaller in self.kernel_sizes[1:]:
            if current == kernel_size:
                break
            cropped = centred_kernel(weight, smaller)
            matrix = self.transforms[f"{current}to{smaller}"]
            shape = cropped.shape
            weight = (cropped.reshape(-1, smaller * smaller) @ matrix.t()).reshape(shape)
            current = smaller
        return weight

    def _active_bias(self, out_channels: int | torch.Tensor) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias.index_select(0, out_channels) if isinstance(out_channels, torch.Tensor) else self.bias[:out_channels]

    def forward(self, x: torch.Tensor, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]."""
        weight, bias = self._cache.get(
            self,
            (in_channels, _selection_key(out_channels), kernel_size),
            lambda: (self.active_weight(in_channels, out_channels, kernel_size), self._active_bias(out_channels)),
        )
        groups = weight.shape[0] if self.depthwise else 1
        return F.conv2d(x, weight, bias, self.stride, self.padding(kernel_size), 1, groups)

    def padding(self, kernel_size: int) -> tuple[int, int]:
        """``(top/bottom, left/right)`` padding that keeps the spatial size at stride 1."""
        height, width = kernel_shape(kernel_size, self.band)
        return (height // 2, width // 2)

    def export(self, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> nn.Conv2d:
        """A static ``nn.Conv2d`` equal to the active choice."""
        count = int(out_channels.numel()) if isinstance(out_channels, torch.Tensor) else out_channels
        groups = count if self.depthwise else 1
        conv = nn.Conv2d(
            in_channels,
            count,
            kernel_shape(kernel_size, self.band),
            self.stride,
            self.padding(kernel_size),
            groups=groups,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            state = {"weight": self.active_weight(in_channels, out_channels, kernel_size)}
            bias = self._active_bias(out_channels)
            if bias is not None:
                state["bias"] = bias
            conv.load_state_dict(state)
        return conv

    @torch.no_grad()
    def permute_(self, out_order: torch.Tensor | None = None, in_order: torch.Tensor | None = None) -> None:
        """Reorder the output channels (and bias) by ``out_order`` and the input channels by ``in_order``, in place.
        A depthwise convolution has one filter per channel: only ``out_order`` applies."""
        if self.depthwise and in_order is not None:
            raise ValueError("a depthwise convolution permutes its channels through out_order only")
        _permute_(self.weight, out_order, 0)
        _permute_(self.bias, out_order, 0)
        _permute_(self.weight, in_order, 1)


class ElasticBatchNorm2d(nn.Module):
    """Batch norm over the leading ``channels`` of its largest choice.

    Set ``momentum = None`` (``reset_running_stats()`` does) to accumulate a cumulative average, which is how BN
    recalibration of one subnet works.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, max_channels: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(max_channels))
        self.bias = nn.Parameter(torch.zeros(max_channels))
        self.register_buffer("running_mean", torch.zeros(max_channels))
        self.register_buffer("running_var", torch.ones(max_channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """x: [B, channels, H, W] -> same shape."""
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(
            x,
            self.running_mean[:channels],
            self.running_var[:channels],
            self.weight[:channels],
            self.bias[:channels],
            self.training,
            factor,
            self.eps,
        )

    @torch.no_grad()
    def permute_(self, order: torch.Tensor) -> None:
        """Reorder the channels (affine parameters and running statistics) by ``order``, in place."""
        for tensor in (self.weight, self.bias, self.running_mean, self.running_var):
            _permute_(tensor, order, 0)

    def export(self, channels: int) -> nn.BatchNorm2d:
        norm = nn.BatchNorm2d(channels, eps=self.eps)
        norm.load_state_dict(
            {
                "weight": self.weight[:channels],
                "bias": self.bias[:channels],
                "running_mean": self.running_mean[:channels],
                "running_var": self.running_var[:channels],
                "num_batches_tracked": self.num_batches_tracked,
            }
        )
        return norm


class ElasticLinear(nn.Module):
    """Linear layer with elastic input and output features.

    ``out_features`` / ``in_features`` are either a count (leading slice) or a 1-D index tensor of rows / columns
    (e.g. from ``head_rows``).
    """

    def __init__(self, max_in_features: int, max_out_features: int, bias: bool = True) -> None:
        super().__init__()
        layer = nn.Linear(max_in_features, max_out_features, bias=bias)
        self.weight = layer.weight
        self.bias = layer.bias
        self._cache = _ActiveWeightCache()

    @staticmethod
    def _select(tensor: torch.Tensor, selection: int | torch.Tensor, dim: int) -> torch.Tensor:
        if isinstance(selection, int):
            return tensor.narrow(dim, 0, selection)
        return tensor.index_select(dim, selection)

    def active(self, in_features: int | torch.Tensor, out_features: int | torch.Tensor) -> ActiveWeights:
        weight = self._select(self._select(self.weight, out_features, 0), in_features, 1)
        bias = None if self.bias is None else self._select(self.bias, out_features, 0)
        return weight, bias

    def forward(self, x: torch.Tensor, in_features: int | torch.Tensor, out_features: int | torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        choice = (_selection_key(in_features), _selection_key(out_features))
        weight, bias = self._cache.get(self, choice, lambda: self.active(in_features, out_features))
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def permute_(self, out_order: torch.Tensor | None = None, in_order: torch.Tensor | None = None) -> None:
        """Reorder the output features (rows and bias) by ``out_order`` and the input features by ``in_order``."""
        _permute_(self.weight, out_order, 0)
        _permute_(self.bias, out_order, 0)
        _permute_(self.weight, in_order, 1)

    def export(self, in_features: int | torch.Tensor, out_features: int | torch.Tensor) -> nn.Linear:
        weight, bias = self.active(in_features, out_features)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer


class ElasticLayerNorm(nn.Module):
    """Layer norm over the leading ``features`` of its largest choice."""

    def __init__(self, max_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(max_features))
        self.bias = nn.Parameter(torch.zeros(max_features))

    def forward(self, x: torch.Tensor, features: int) -> torch.Tensor:
        """x: [..., features] -> same shape."""
        return F.layer_norm(x, (features,), self.weight[:features], self.bias[:features], self.eps)

    def export(self, features: int) -> nn.LayerNorm:
        norm = nn.LayerNorm(features, eps=self.eps)
        with torch.no_grad():
            norm.weight.copy_(self.weight[:features])
            norm.bias.copy_(self.bias[:features])
        return norm


class ElasticLayerScale(nn.Module):
    """``LayerScale`` over the leading ``channels`` of its largest choice. x: [B, channels, H, W] -> same shape."""

    def __init__(self, max_channels: int, init: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((max_channels,), float(init)))

    def forward(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return x * self.weight[:channels].view(1, -1, 1, 1)

    def export(self, channels: int) -> LayerScale:
        scale = LayerScale(channels)
        with torch.no_grad():
            scale.weight.copy_(self.weight[:channels])
        return scale


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of a static module."""
    return sum(parameter.numel() for parameter in module.parameters())


__all__ = [
    "BANDS",
    "ActiveWeights",
    "attention_orders",
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticLayerNorm",
    "ElasticLayerScale",
    "ElasticLinear",
    "centred_kernel",
    "count_parameters",
    "head_major_order",
    "head_rows",
    "importance_order",
    "kernel_shape",
]
