"""Private BatchNorm: shared convolutions, one set of BatchNorm statistics and affine per scale.

A BatchNorm layer's running statistics are an average over every batch it saw in training; a
network trained at several input scales with one BatchNorm averages very different statistics
and fits none of the scales (RS-Nets, Wang et al., ECCV 2020, section 3.1). Private BatchNorm
keeps one set per training scale and shares everything else.

- :class:`PrivateBatchNorm2d` holds the K sets as rows of (K, C) tensors, so a model keeps its
  module names (``layer1.0.bn1``) and a layer stays one module for hooks and presets; the set
  in use is ``active``, chosen for a whole model with :func:`use_bn_set`.
- :class:`ScaleBNNet`: a torchvision classifier with private BatchNorm per training scale (the
  ``--method mst --bn private`` network). Inputs are routed to a set by their size with the same
  fixed table as MSUN's paths, so ckascope and ``msun eval`` treat it as a multi-path model.

``msun.model.build_msun(..., bn="private")`` gives an MSUN's shared trunk one set per path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ckascope.platform import InputError, Protocol, build_model, check_protocol, resize
from msun.backbones import classifier
from msun.config import BN_MODES

_NET = re.compile(r"^net(?:\.|$)")


class PrivateBatchNorm2d(nn.Module):
    """BatchNorm2d with ``num_sets`` independent sets of statistics and affine parameters.

    Set k behaves exactly as an ``nn.BatchNorm2d`` would (same defaults, momentum None for a
    cumulative average, ``num_batches_tracked`` per set); only the active set is used and
    updated by a forward pass.

    Attributes:
        weight, bias: (K, C) affine parameters (when ``affine``).
        running_mean, running_var: (K, C) statistics; num_batches_tracked: (K,).
        active: The set the next forward passes use.
    """

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        num_sets: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if num_sets < 1:
            raise InputError(f"a private BatchNorm needs at least one set, got {num_sets}")
        self.num_features, self.num_sets = num_features, num_sets
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.active = num_sets - 1
        shape = (num_sets, num_features)
        self.weight = nn.Parameter(torch.ones(shape)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if affine else None
        track = track_running_stats  # without statistics the buffers exist as None, as torch's
        self.register_buffer("running_mean", torch.zeros(shape) if track else None)
        self.register_buffer("running_var", torch.ones(shape) if track else None)
        count = torch.zeros(num_sets, dtype=torch.long) if track else None
        self.register_buffer("num_batches_tracked", count)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, num_sets: int) -> PrivateBatchNorm2d:
        """K copies of ``bn``'s state (pretrained or fresh), on its device and dtype."""
        new = cls(
            bn.num_features,
            num_sets,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
        )
        with torch.no_grad():
            for name, tensor in [*bn.named_parameters(), *bn.named_buffers()]:
                mine = getattr(new, name)
                mine.data = tensor.detach().expand(num_sets, *tensor.shape).clone()
        new.train(bn.training)
        return new

    def reset_running_stats(self) -> None:
        """Every set's statistics back to mean 0, variance 1, no batches (as BatchNorm's)."""
        if self.track_running_stats:
            assert self.running_mean is not None
            assert self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """BatchNorm of (B, C, H, W) with the active set (mirrors ``nn.BatchNorm2d.forward``)."""
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")  # as BatchNorm2d
        k = self.active
        factor = 0.0 if self.momentum is None else self.momentum
        tracking = self.training and self.track_running_stats
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked[k].add_(1)  # a row view: the update lands in the buffer
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked[k])
        mean, var = self._row("running_mean"), self._row("running_var")
        use_batch = self.training or mean is None
        return F.batch_norm(
            x, mean, var, self._row("weight"), self._row("bias"), use_batch, factor, self.eps
        )

    def _row(self, name: str) -> Tensor | None:
        tensor: Tensor | None = getattr(self, name)
        return None if tensor is None else tensor[self.active]

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"{self.num_features}, sets={self.num_sets}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, active={self.active}"
        )


def privatize(module: nn.Module, num_sets: int) -> int:
    """Replaces every ``nn.BatchNorm2d`` inside ``module`` by a private one of ``num_sets`` sets.

    Each set starts as a copy of the layer it replaces, so a pretrained or seeded model keeps
    its starting point; the module names stay the same.

    Returns:
        How many layers were replaced.
    """
    found = [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, nn.BatchNorm2d) and name
    ]
    for name, bn in found:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, PrivateBatchNorm2d.from_batchnorm(bn, num_sets))
    return len(found)


def bn_sets(module: nn.Module) -> list[PrivateBatchNorm2d]:
    """The private BatchNorm layers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, PrivateBatchNorm2d)]


@contextlib.contextmanager
def use_bn_set(module: nn.Module, k: int) -> Iterator[None]:
    """Every private BatchNorm inside ``module`` uses set ``k`` in the block; the old set after."""
    layers = bn_sets(module)
    for layer in layers:  # all checked before any is switched
        if not 0 <= k < layer.num_sets:
            raise InputError(f"BatchNorm set {k} does not exist ({layer.num_sets} sets)")
    before = [layer.active for layer in layers]
    for layer in layers:
        layer.active = k
    try:
        yield
    finally:
        for layer, old in zip(layers, before, strict=True):
            layer.active = old


def route_size(routing: Sequence[int], size: int) -> int:
    """The path (or set) serving inputs of ``size`` under the fixed table ``routing``.

    Path k serves sizes up to ``routing[k]``; the last path (``len(routing)``) the rest. The
    one rule MSUN's paths and a private-BatchNorm network's sets follow.
    """
    return next((k for k, bound in enumerate(routing) if size <= bound), len(routing))


def check_bn(bn: str) -> str:
    """Validates a BatchNorm mode.

    Raises:
        InputError: Not ``shared`` or ``private``.
    """
    if bn not in BN_MODES:  # msun.config's: the option's one list
        raise InputError(f"bad BatchNorm mode {bn!r}. Hint: choose one of {', '.join(BN_MODES)}")
    return bn


class ScaleBNNet(nn.Module):
    """A torchvision classifier with one private BatchNorm set per training scale.

    Set k was trained on images brought to ``scales[k]`` and back up to ``image_size`` (MST's
    input); a test image of size s uses the set of the training scale the fixed table
    ``routing`` sends s to (the rule MSUN routes its paths by), decided before any evaluation.
    The sets are its "paths" for ckascope and ``msun eval``: the per-path table shows every set.

    Attributes:
        net: The network, its module names torchvision's (``net.layer1.0.bn1``).
        arch: torchvision model name.
        scales: The training scales, ascending.
        routing: Upper bounds (inclusive) of the sizes served by sets 0..K-2.
        image_size: The size the network sees (inputs are resized to it under ``upsample``).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        scales: tuple[int, ...],
        routing: tuple[int, ...],
        image_size: int,
    ) -> None:
        super().__init__()
        self.net = net
        self.arch, self.scales, self.routing = arch, scales, routing
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        """Output classes (read from the classifier, which fine-tuning may replace)."""
        return classifier(self.net)[1].out_features

    @property
    def num_paths(self) -> int:
        """Number of BatchNorm sets (one per training scale)."""
        return len(self.scales)

    def route(self, size: int) -> int:
        """The set serving inputs of ``size``."""
        return route_size(self.routing, size)

    def forward_path(self, x: Tensor, k: int, *, protocol: Protocol = "upsample") -> Tensor:
        """Logits (B, num_classes) of images x (B, 3, H, W) with BatchNorm set k.

        ``upsample`` first resizes x to ``image_size`` (the input MST trains on), ``native``
        feeds it as it is.
        """
        check_protocol(protocol)
        if not 0 <= k < self.num_paths:
            raise InputError(
                f"BatchNorm set {k} does not exist. Hint: choose one of "
                f"{list(range(self.num_paths))} (training scales {list(self.scales)})"
            )
        if protocol == "upsample":
            x = resize(x, self.image_size)
        with use_bn_set(self.net, k):
            return self.net(x)  # type: ignore[no-any-return]

    def forward(self, x: Tensor, *, protocol: Protocol = "upsample") -> Tensor:
        """Logits (B, num_classes) with the set routed by the input size max(H, W)."""
        return self.forward_path(x, self.route(max(x.shape[-2:])), protocol=protocol)

    @staticmethod
    def canonical_name(name: str) -> str:
        """The torchvision name of a module: ``net.layer1.0`` -> ``layer1.0``, ``net`` -> ""."""
        match = _NET.match(name)
        if match is None:
            raise InputError(f"{name!r} is not a module of a ScaleBNNet. Hint: names start 'net.'")
        return name[match.end() :]

    @staticmethod
    def path_of(name: str) -> int | None:
        """None: every module is shared (a private BatchNorm switches its set inside)."""
        return None

    def config(self) -> dict[str, Any]:
        """What :func:`build_scale_bn_net` needs to rebuild this model (JSON-able)."""
        return {
            "arch": self.arch,
            "scales": list(self.scales),
            "routing": list(self.routing),
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }

    def describe(self) -> str:
        """What this model is, for messages."""
        return f"{self.arch} with private BatchNorm per scale {list(self.scales)}"

    def extra_repr(self) -> str:  # noqa: D102
        return f"arch={self.arch}, scales={self.scales}, routing={self.routing}, image_size={self.image_size}"


def build_scale_bn_net(
    arch: str,
    *,
    scales: Sequence[int],
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    routing: Sequence[int] | None = None,
    seed: int = 0,
) -> ScaleBNNet:
    """A torchvision classifier with private BatchNorm per training scale.

    Args:
        arch: torchvision model name.
        scales: Training scales, 2 to 5 strictly increasing positive ints.
        num_classes: Output classes (a pretrained model keeps its 1000; replace the head after).
        image_size: The size the network sees.
        weights: None/"none" for random init, else a weights name (``ckascope.models``).
        routing: K-1 increasing upper bounds; None routes each size to the smallest scale >= it.
        seed: Seed of a random initialisation (the global generator is left as it is).

    Raises:
        InputError: Bad scales, routing, architecture or weights.
    """
    from msun.model import check_routing, check_scales  # the rules MSUN's paths follow

    scale_tuple = check_scales(scales)
    route_tuple = check_routing(routing, scale_tuple)
    pretrained = weights is not None and weights.lower() != "none"
    net = build_model(
        arch,
        weights if pretrained else "none",
        num_classes=None if pretrained else num_classes,
        seed=seed,
    )
    if privatize(net, len(scale_tuple)) == 0:
        raise InputError(
            f"{arch} has no BatchNorm layers, so private BatchNorm changes nothing. Hint: use "
            "--bn shared, or a model with BatchNorm (e.g. vgg16_bn instead of vgg16)"
        )
    return ScaleBNNet(
        net, arch=arch, scales=scale_tuple, routing=route_tuple, image_size=image_size
    ).train()
