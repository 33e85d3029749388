"""Mixture-of-Supernets (Jawahar et al., 2023, "Mixture-of-Supernets: Improving Weight-Sharing Supernet Training with
Architecture-Routed Mixture-of-Experts").

A plain supernet gives every subnet the leading slice of one shared weight, so subnets of different sizes pull that
weight in different directions. Mixture-of-Supernets keeps ``E`` expert copies of each weight-bearing layer's largest
weight and lets a small router, which reads the architecture, mix them: the active subnet's weight is

    W(arch) = sum_e alpha_e(arch) * W_e          (then sliced to the active width exactly as a plain supernet does)

with ``alpha(arch)`` a softmax over the experts. ``routing: layerwise`` gives one ``E``-vector per layer (the paper's
layer-wise MoS); ``routing: neuronwise`` one ``E``-vector per output unit of the layer (neuron-wise MoS), so each row
of ``W`` has its own mixture. The router is one MLP: the arch's encoding ``[F]`` (the space walk's one-hot features,
``SpaceWalk.features``: one block per free decision, a 1 at the chosen value, zeros where the decision is inactive)
-> ``Linear(F, router_hidden)`` + ReLU (shared by every layer, ``MixtureSupernet.router``) -> one output head per
layer (``Linear(router_hidden, E)`` or ``Linear(router_hidden, O_max * E)``, owned by the layer). Mixing and slicing
are linear, so a subnet is still an ordinary static network: ``extract`` bakes the mixture of its arch into plain
weights, and the static module and its ONNX export are those of the plain supernet.

Which layers hold experts: every ``ElasticLinear`` and every non-depthwise ``ElasticConv2d`` without kernel transforms
(the 1x1 convolutions of MBConv and the image head, the stem and the image stage-entry projections). Depthwise
convolutions (a small share of the weights, and the only layers with Once-for-All's kernel transforms), norms,
embeddings, the sequence stem and subclasses of the elastic layers (a plugin's own slicing) stay shared.

Which subnets train each step: the sandwich rule (``SandwichRule``: the largest, the smallest and
``random_subnets`` random subnets, with in-place distillation when ``distill``); its options are options here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, StrictInt
from torch import nn

from ..elastic import ActiveWeights, ElasticConv2d, ElasticLinear, centred_kernel, kernel_shape
from ..space import Arch, SearchSpace
from ..supernet import StaticNet, Supernet
from .base import STRATEGIES, StrategyError
from .sandwich import SandwichOptions, SandwichRule

Routing = Literal["layerwise", "neuronwise"]

EXPERT_NOISE = 0.1
"""Standard deviation of the noise that sets experts 1..E-1 apart from expert 0 at initialisation, relative to the
standard deviation of expert 0's values in the same tensor (see ``ExpertMixture``)."""

Selection = int | torch.Tensor
"""An active size: a leading count, or a 1-D index tensor of rows / columns (``head_rows``)."""


class MixtureOptions(SandwichOptions):
    """``experts``: expert copies of every weight-bearing layer (1 is the plain supernet). ``routing``: one mixture per
    layer (``layerwise``) or per output unit of a layer (``neuronwise``). ``router_hidden``: hidden width of the
    router MLP. The sandwich rule's options (``random_subnets``, ``distill``, ``largest_only_epochs``) apply too."""

    experts: Annotated[StrictInt, Field(ge=1, le=16)] = 2
    routing: Routing = "layerwise"
    router_hidden: Annotated[StrictInt, Field(ge=1, le=4096)] = 32


def _selection_key(selection: Selection) -> int | tuple[int, ...]:
    return selection if isinstance(selection, int) else tuple(selection.tolist())


def _select(tensor: torch.Tensor, selection: Selection, dim: int) -> torch.Tensor:
    """The leading ``selection`` entries of ``tensor`` along ``dim``, or those it indexes."""
    if isinstance(selection, int):
        return tensor.narrow(dim, 0, selection)
    return tensor.index_select(dim, selection.to(tensor.device))


def _jittered(tensor: torch.Tensor) -> nn.Parameter:
    """A copy of ``tensor`` plus Gaussian noise of ``EXPERT_NOISE`` times its standard deviation (global torch RNG)."""
    with torch.no_grad():
        scale = EXPERT_NOISE * float(tensor.std(correction=0)) if tensor.numel() > 1 else 0.0
        return nn.Parameter(tensor.detach() + scale * torch.randn_like(tensor))


class ExpertMixture(nn.Module):
    """The experts beyond the first of one layer, and the layer's router head.

    Expert 0 is the layer's own ``weight`` / ``bias`` (so a one-expert mixture has exactly the plain supernet's
    parameters); ``weights[e - 1]`` / ``biases[e - 1]`` hold expert ``e`` with the same shapes.

    Initialisation: every expert starts as expert 0 (the plain supernet's initialisation) plus small noise
    (``EXPERT_NOISE``). Independent initialisations would make the initial mixture, an average of ``E`` independent
    draws, shrink the weights' scale by up to ``sqrt(E)`` and start far from a well-scaled network; identical copies
    would never separate: while the experts are equal the softmax gradient of every router logit is zero, and every
    expert receives the same update. Shared values plus noise start from the plain supernet's function at the usual
    scale and give the router a gradient from the first step; the experts then drift apart as archs routed to them
    differently train them. The router head starts at zero, so every arch starts from the uniform mixture.

    ``router_head``: ``Linear(router_hidden, E)`` (layerwise) or ``Linear(router_hidden, O_max * E)`` (neuronwise,
    laid out ``[O_max, E]``); None when ``E == 1``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, experts: int, routing: Routing, router_hidden: int) -> None:
        super().__init__()
        if experts < 1:
            raise ValueError(f"experts must be at least 1, got {experts}")
        self.experts = experts
        self.routing = routing
        self.max_outputs = int(weight.shape[0])
        self.weights = nn.ParameterList(_jittered(weight) for _ in range(experts - 1))
        self.biases = nn.ParameterList(_jittered(bias) for _ in range(experts - 1)) if bias is not None else nn.ParameterList()
        self.router_head: nn.Linear | None = None
        if experts > 1:
            outputs = experts if routing == "layerwise" else self.max_outputs * experts
            self.router_head = nn.Linear(router_hidden, outputs)
            nn.init.zeros_(self.router_head.weight)
            nn.init.zeros_(self.router_head.bias)

    def coefficients(self, features: torch.Tensor | None) -> torch.Tensor:
        """Mixing weights from the router's shared ``features: [router_hidden]``: ``[E]`` (layerwise) or
        ``[O_max, E]`` (neuronwise), each summing to 1 over the experts."""
        if self.router_head is None:
            raise RuntimeError("a one-expert layer has no router")
        if features is None:
            raise RuntimeError(
                "a mixture layer runs inside MixtureSupernet.forward or MixtureSupernet.extract, which hand it the router's features for the active arch"
            )
        logits = self.router_head(features)
        if self.routing == "neuronwise":
            logits = logits.view(self.max_outputs, self.experts)
        return torch.softmax(logits, dim=-1)

    def combine(self, sliced: Sequence[torch.Tensor], coefficients: torch.Tensor, outputs: Selection) -> torch.Tensor:
        """``sum_e alpha_e * sliced[e]``. sliced: ``E`` tensors ``[O, ...]`` (each expert sliced to the active choice);
        coefficients: ``[E]`` or ``[O_max, E]`` (the rows ``outputs`` selects are used) -> ``[O, ...]``."""
        stacked = torch.stack(list(sliced))
        if coefficients.ndim == 1:
            alpha = coefficients.reshape(-1, *([1] * (stacked.ndim - 1)))
        else:
            alpha = _select(coefficients, outputs, 0).t().reshape(*stacked.shape[:2], *([1] * (stacked.ndim - 2)))
        return (alpha * stacked).sum(dim=0)

    @torch.no_grad()
    def permute_(self, weight: torch.Tensor, bias: torch.Tensor | None, out_order: torch.Tensor | None, in_order: torch.Tensor | None) -> None:
        """Reorder, in place, the outputs (dim 0 of every expert's weight and bias, and the neuronwise head's rows) by
        ``out_order`` and the inputs (dim 1 of every expert's weight) by ``in_order``; ``weight`` / ``bias`` are the
        layer's own (expert 0)."""
        biases = [] if bias is None else [bias, *self.biases]
        for tensors, dim, order in (([weight, *self.weights, *biases], 0, out_order), ([weight, *self.weights], 1, in_order)):
            if order is not None:
                for tensor in tensors:
                    tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))
        head = self.router_head
        if head is not None and out_order is not None and self.routing == "neuronwise":
            order = out_order.to(head.weight.device)
            rows = head.weight.view(self.max_outputs, self.experts, -1)
            head.weight.copy_(rows.index_select(0, order).reshape(head.weight.shape))
            head.bias.copy_(head.bias.view(self.max_outputs, self.experts).index_select(0, order).reshape(-1))


class MixtureLinear(ElasticLinear):
    """``ElasticLinear`` whose weight is a router-mixed combination of ``E`` experts.

    ``weight: [O_max, I_max]`` / ``bias: [O_max]`` are expert 0; ``mixture`` holds the others and the router head.
    ``router_features: [router_hidden]`` (set by ``MixtureSupernet`` around each forward and extraction) are the
    shared router's output for the active arch; ``router_key`` identifies them in the no-grad weight cache.
    """

    def __init__(self, source: ElasticLinear, *, experts: int, routing: Routing, router_hidden: int) -> None:
        out_features, in_features = source.weight.shape
        super().__init__(in_features, out_features, bias=source.bias is not None)
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if self.bias is not None and source.bias is not None:
                self.bias.copy_(source.bias)
        self.mixture = ExpertMixture(self.weight, self.bias, experts=experts, routing=routing, router_hidden=router_hidden)
        self.router_features: torch.Tensor | None = None
        self.router_key: tuple[float, ...] | None = None

    def active(self, in_features: Selection, out_features: Selection) -> ActiveWeights:
        """The mixture of the experts for the active arch, sliced: weight ``[out, in]``, bias ``[out]`` or None."""
        if self.mixture.experts == 1:
            return super().active(in_features, out_features)
        alpha = self.mixture.coefficients(self.router_features)
        weights = [_select(_select(weight, out_features, 0), in_features, 1) for weight in (self.weight, *self.mixture.weights)]
        weight = self.mixture.combine(weights, alpha, out_features)
        bias = None
        if self.bias is not None:
            bias = self.mixture.combine([_select(bias, out_features, 0) for bias in (self.bias, *self.mixture.biases)], alpha, out_features)
        return weight, bias

    def forward(self, x: torch.Tensor, in_features: Selection, out_features: Selection) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]."""
        choice = (_selection_key(in_features), _selection_key(out_features), self.router_key)
        weight, bias = self._cache.get(self, choice, lambda: self.active(in_features, out_features))
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def permute_(self, out_order: torch.Tensor | None = None, in_order: torch.Tensor | None = None) -> None:
        """Reorder the output features (rows, bias, neuronwise router rows) by ``out_order`` and the input features by
        ``in_order``, in every expert."""
        self.mixture.permute_(self.weight, self.bias, out_order, in_order)


class MixtureConv2d(ElasticConv2d):
    """Non-depthwise ``ElasticConv2d`` without kernel transforms whose weight is a router-mixed combination of ``E``
    experts (see ``MixtureLinear``). ``weight: [O_max, I_max, K, K]`` / ``bias: [O_max]`` are expert 0. The active
    weight of every expert is its leading ``[out, in]`` slice, centred ``k x k`` window (the rule of
    ``ElasticConv2d.active_weight`` for a convolution without transforms)."""

    def __init__(self, source: ElasticConv2d, *, experts: int, routing: Routing, router_hidden: int) -> None:
        if not eligible_conv(source):
            raise ValueError("MixtureConv2d takes a non-depthwise ElasticConv2d without kernel transforms")
        out_channels, in_channels = source.weight.shape[:2]
        super().__init__(in_channels, out_channels, source.kernel_sizes, source.stride, bias=source.bias is not None, band=source.band)
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if self.bias is not None and source.bias is not None:
                self.bias.copy_(source.bias)
        self.mixture = ExpertMixture(self.weight, self.bias, experts=experts, routing=routing, router_hidden=router_hidden)
        self.router_features: torch.Tensor | None = None
        self.router_key: tuple[float, ...] | None = None

    def active(self, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> ActiveWeights:
        """The mixture of the experts for the active arch, sliced: weight ``[out, in, k, k]``, bias ``[out]`` or None."""
        if isinstance(out_channels, torch.Tensor):
            raise ValueError("only a depthwise convolution selects its channels by index")
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel_size must be one of {sorted(self.kernel_sizes)}, got {kernel_size}")
        weights = [centred_kernel(weight[:out_channels, :in_channels], kernel_size, self.band) for weight in (self.weight, *self.mixture.weights)]
        biases = [] if self.bias is None else [bias[:out_channels] for bias in (self.bias, *self.mixture.biases)]
        if self.mixture.experts == 1:
            return weights[0], biases[0] if biases else None
        alpha = self.mixture.coefficients(self.router_features)
        return self.mixture.combine(weights, alpha, out_channels), self.mixture.combine(biases, alpha, out_channels) if biases else None

    def active_weight(self, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> torch.Tensor:
        """Weight of the active choice for the active arch: ``[out, in, k, k]``."""
        return self.active(in_channels, out_channels, kernel_size)[0]

    def forward(self, x: torch.Tensor, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]."""
        choice = (in_channels, _selection_key(out_channels), kernel_size, self.router_key)
        weight, bias = self._cache.get(self, choice, lambda: self.active(in_channels, out_channels, kernel_size))
        return F.conv2d(x, weight, bias, self.stride, self.padding(kernel_size))

    def export(self, in_channels: int, out_channels: int | torch.Tensor, kernel_size: int) -> nn.Conv2d:
        """A static ``nn.Conv2d`` holding a copy of the active arch's mixed weights."""
        if isinstance(out_channels, torch.Tensor):
            raise ValueError("only a depthwise convolution selects its channels by index")
        conv = nn.Conv2d(in_channels, out_channels, kernel_shape(kernel_size, self.band), self.stride, self.padding(kernel_size), bias=self.bias is not None)
        with torch.no_grad():
            weight, bias = self.active(in_channels, out_channels, kernel_size)
            state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
            conv.load_state_dict(state)
        return conv

    @torch.no_grad()
    def permute_(self, out_order: torch.Tensor | None = None, in_order: torch.Tensor | None = None) -> None:
        """Reorder the output channels (filters, bias, neuronwise router rows) by ``out_order`` and the input channels
        by ``in_order``, in every expert."""
        self.mixture.permute_(self.weight, self.bias, out_order, in_order)


MixtureLayer = MixtureLinear | MixtureConv2d


def eligible_conv(module: ElasticConv2d) -> bool:
    """Whether a convolution holds experts: non-depthwise and without kernel transforms."""
    return not module.depthwise and len(module.transforms) == 0


class MixtureSupernet(Supernet):
    """A ``Supernet`` whose weight-bearing layers mix ``experts`` expert weights by an arch-conditioned router.

    image x: [B, C, R, R] -> logits [B, classes]; sequence tokens: [B, L] -> logits [B, L, classes] (as ``Supernet``).

    ``router``: ``Linear(F, router_hidden)`` + ReLU over the active arch's encoding ``[F]`` (``encoding``), run once
    per forward (with gradients while training, so every step builds a fresh graph through the router); each mixture
    layer (``mixture_layers``, in module order) turns its output into mixing weights with its own head. None when
    ``experts == 1``: the network is then the plain ``Supernet`` with the same parameters and state-dict keys.

    ``set_active`` and ``extract`` keep their meaning; ``extract`` evaluates the router for the arch under no_grad and
    bakes the mixture into the static layers. The no-grad weight cache of every layer is keyed on the router's output
    values (so two archs with equal widths but different mixtures never share cached weights) and, as for every
    elastic layer, on the versions of the layer's own parameters (experts and router head).

    The structure (which layers, their expert and head shapes, in which order) is a function of ``space`` and the
    options only, so checkpoints load into a freshly built ``MixtureSupernet``.
    """

    def __init__(self, space: SearchSpace, *, experts: int = 2, routing: Routing = "layerwise", router_hidden: int = 32) -> None:
        if not 1 <= experts <= 16:
            raise ValueError(f"experts must be between 1 and 16, got {experts}")
        if routing not in ("layerwise", "neuronwise"):
            raise ValueError(f"routing must be one of ['layerwise', 'neuronwise'], got {routing!r}")
        if router_hidden < 1:
            raise ValueError(f"router_hidden must be at least 1, got {router_hidden}")
        super().__init__(space)
        self.experts = experts
        self.routing: Routing = routing
        self.router_hidden = router_hidden
        self.encoding_width = max(1, len(space.walk().feature_names))
        layers: list[MixtureLayer] = []
        for name, module in list(self.named_modules()):
            replacement: MixtureLayer
            if type(module) is ElasticLinear:
                replacement = MixtureLinear(module, experts=experts, routing=routing, router_hidden=router_hidden)
            elif type(module) is ElasticConv2d and eligible_conv(module):
                replacement = MixtureConv2d(module, experts=experts, routing=routing, router_hidden=router_hidden)
            else:
                continue
            parent, _, leaf = name.rpartition(".")
            self.get_submodule(parent).register_module(leaf, replacement)
            layers.append(replacement)
        self.mixture_layers: tuple[MixtureLayer, ...] = tuple(layers)
        self.router = nn.Sequential(nn.Linear(self.encoding_width, router_hidden), nn.ReLU()) if experts > 1 else None
        self._encoded: tuple[Arch, torch.Tensor] | None = None

    def encoding(self, arch: Arch) -> torch.Tensor:
        """The router's input for ``arch``: ``[F]`` float32, the space walk's one-hot features (one block per free
        decision; a single zero when the space has no free decision)."""
        reference = self.classifier.weight
        cached = self._encoded
        if cached is None or cached[0] != arch or cached[1].device != reference.device or cached[1].dtype != reference.dtype:
            features = torch.zeros(self.encoding_width)
            matrix = self.space.walk().features([arch])
            features[: matrix.shape[1]] = torch.from_numpy(matrix[0])
            cached = (arch, features.to(device=reference.device, dtype=reference.dtype))
            self._encoded = cached
        return cached[1]

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """Run the router for the active arch and hand its output to every mixture layer for the duration."""
        if self.router is None:
            yield
            return
        features = self.router(self.encoding(self.arch))
        key = None if torch.is_grad_enabled() else tuple(features.tolist())
        for layer in self.mixture_layers:
            layer.router_features, layer.router_key = features, key
        try:
            yield
        finally:
            for layer in self.mixture_layers:
                layer.router_features, layer.router_key = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.routed():
            return super().forward(x)

    def extract(self, arch: Arch | None = None) -> StaticNet:
        """The static subnet of ``arch`` (default: the active one) with the router's mixture baked into plain weights,
        sharing no storage with the supernet."""
        if arch is not None:
            self.set_active(arch)
        with torch.no_grad(), self.routed():
            return super().extract()

    @torch.no_grad()
    def mixing_weights(self, arch: Arch | None = None) -> dict[str, torch.Tensor]:
        """Every mixture layer's mixing weights for ``arch`` (default: the active one), by module name: ``[E]``
        (layerwise) or ``[O_max, E]`` (neuronwise). Empty when ``experts == 1``."""
        if self.router is None:
            return {}
        features = self.router(self.encoding(self.arch if arch is None else arch))
        names = {id(module): name for name, module in self.named_modules()}
        return {names[id(layer)]: layer.mixture.coefficients(features) for layer in self.mixture_layers}


@STRATEGIES.decorator("mixture")
class MixtureOfSupernets(SandwichRule):
    """Mixture-of-Supernets (see the module docstring): a ``MixtureSupernet`` trained by the sandwich rule."""

    name = "mixture"
    options_type = MixtureOptions

    @classmethod
    def build_supernet(cls, space: SearchSpace, options: SandwichOptions) -> Supernet:
        if not isinstance(options, MixtureOptions):
            raise StrategyError(f"strategy {cls.name!r} takes MixtureOptions options, got {type(options).__name__}")
        return MixtureSupernet(space, experts=options.experts, routing=options.routing, router_hidden=options.router_hidden)


__all__ = ["EXPERT_NOISE", "ExpertMixture", "MixtureConv2d", "MixtureLinear", "MixtureOfSupernets", "MixtureOptions", "MixtureSupernet", "eligible_conv"]
