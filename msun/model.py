"""The Multi-scale Unified Network: per-scale subnets, a shared trunk, routing by input size.

Module names keep torchvision's names inside each part — ``subnets.{k}.<name>``,
``trunk.<name>``, ``head.<name>`` — so ``MSUN.canonical_name`` maps any module of any path back
to the vanilla model's name (e.g. ``subnets.0.layer1.2`` and ``subnets.2.layer1.2`` are both
``layer1.2``), which lets ckascope align corresponding layers of different paths.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torchvision
from torch import nn
from torch.func import functional_call

from ckascope.platform import MAX_SCALE, InputError, Protocol, build_model, check_protocol
from ckascope.platform import resize as resize_images
from msun.backbones import Head, backbone_for, check_split, classifier, make_subnets
from msun.privatebn import check_bn, privatize, route_size, use_bn_set
from msun.recipes import recipe_for

#: At most this many subnets (the paper's ablation goes from 2 to 5).
MAX_SUBNETS = 5
_PART = re.compile(r"^(?:subnets(?:\.(\d+))?|trunk|head)(?:\.|$)")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Puts ``module`` in eval mode, then gives every submodule its own mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.train(mode)


def run_on_meta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a meta ``x``, with meta copies of the tensors when they live elsewhere."""
    tensors = dict(itertools.chain(module.named_parameters(), module.named_buffers()))
    if all(t.is_meta for t in tensors.values()):
        out: torch.Tensor = module(x)
        return out
    meta = {n: t.to("meta") for n, t in tensors.items()}
    return functional_call(module, meta, (x,))  # type: ignore[no-any-return]


class MSUN(nn.Module):
    """Subnets (one per nominal input size) + shared trunk + head, routed by input size.

    Build it with :func:`build_msun`. Path ``k`` is ``subnets[k]`` followed by a bilinear resize
    of its output to ``unified_size``, the trunk and the head. Paths are ordered by ascending
    nominal size; the last one is the unchanged vanilla network.

    Attributes:
        arch: torchvision model name, e.g. "resnet50".
        family: "resnet", "densenet", "vgg" or "mobilenet_v2".
        split_at: Name of the first stage of the shared trunk, e.g. "layer2".
        scales: Nominal input size of each path, ascending.
        routing: Upper bounds (inclusive) of the input sizes served by paths 0..K-2; the last
            path serves everything larger.
        bn: "shared", or "private": the trunk's BatchNorm layers hold one set per path
            (``msun.privatebn``), path k uses set k.
        subnet_sizes: Spatial output size of each subnet at its nominal input (before the
            unified resize).
        unified_size: Spatial size of the trunk's input (the largest subnet's output size).
    """

    def __init__(
        self,
        *,
        arch: str,
        split_at: str,
        scales: tuple[int, ...],
        routing: tuple[int, ...],
        subnets: nn.ModuleList,
        trunk: nn.Sequential,
        head: Head,
        bn: str = "shared",
    ) -> None:
        super().__init__()
        self.subnets = subnets
        self.trunk = trunk
        self.head = head
        self.arch = arch
        self.family = backbone_for(arch).family
        self.split_at = split_at
        self.scales = scales
        self.routing = routing
        self.bn = check_bn(bn)
        if bn == "private" and privatize(self.trunk, len(scales)) == 0:
            raise InputError(
                f"{arch}'s trunk has no BatchNorm layers, so a private-BN trunk changes nothing. "
                "Hint: use --bn shared, or a model with BatchNorm (e.g. vgg16_bn instead of vgg16)"
            )
        self.subnet_sizes = tuple(self._output_size(k) for k in range(len(scales)))
        self.unified_size = self.subnet_sizes[-1]

    def _output_size(self, k: int) -> int:
        """Spatial output size of subnet k at its nominal input, from a shape-only dry run.

        Runs on the meta device (no compute, no memory) in eval mode (cheaper there, and
        BatchNorm statistics stay untouched); each module's mode is restored afterwards.
        """
        x = torch.empty(1, 3, self.scales[k], self.scales[k], device="meta")
        try:
            with eval_mode(self.subnets[k]) as subnet:
                return int(run_on_meta(subnet, x).shape[-1])
        except RuntimeError as e:
            raise InputError(
                f"scale {self.scales[k]} is too small for {self.arch} split at {self.split_at} "
                f"({e}). Hint: use larger scales or an earlier split point"
            ) from e

    def config(self) -> dict[str, Any]:
        """What :func:`build_msun` needs to rebuild this model (JSON-able)."""
        return {
            "arch": self.arch,
            "split_at": self.split_at,
            "scales": list(self.scales),
            "num_classes": self.num_classes,
            "routing": list(self.routing),
            # only when private: a published MSUN's file stays readable by earlier versions
            **({"bn": self.bn} if self.bn == "private" else {}),
        }

    def describe(self) -> str:
        """What this model is, for messages: "resnet18 MSUN split at layer2"."""
        private = ", private trunk BatchNorm" if self.bn == "private" else ""
        return f"{self.arch} MSUN split at {self.split_at}{private}"

    def extra_repr(self) -> str:  # noqa: D102
        return (
            f"arch={self.arch}, split_at={self.split_at}, scales={self.scales}, "
            f"routing={self.routing}, unified_size={self.unified_size}, bn={self.bn}"
        )

    @property
    def num_classes(self) -> int:
        """Output classes, read from the classifier (fine-tuning may replace it)."""
        return classifier(self.head)[1].out_features

    @property
    def num_paths(self) -> int:
        """Number of subnets (paths)."""
        return len(self.scales)

    def route(self, size: int) -> int:
        """The path serving inputs of ``size`` (max of height and width)."""
        return route_size(self.routing, size)

    def _check_path(self, k: int) -> int:
        if not 0 <= k < self.num_paths:
            raise InputError(
                f"path {k} does not exist. Hint: choose one of {list(range(self.num_paths))} "
                f"(nominal sizes {list(self.scales)})"
            )
        return k

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(
                f"expected images of shape (batch, 3, height, width), got {tuple(x.shape)}. "
                "Hint: MSUN takes RGB images (3 channels)"
            )

    def unify(self, z: torch.Tensor) -> torch.Tensor:
        """Resizes a subnet output (B, C, h, w) to (B, C, unified_size, unified_size)."""
        return resize_images(z, self.unified_size)

    def forward_subnet(
        self, x: torch.Tensor, k: int, *, protocol: Protocol = "upsample"
    ) -> torch.Tensor:
        """z_k: subnet k's output resized to the unified size.

        Args:
            x: Images (B, 3, H, W); one size per batch.
            k: Path index.
            protocol: ``upsample`` resizes x to the path's nominal size first (the accuracy
                protocol), ``native`` feeds it as it is.

        Returns:
            (B, C, unified_size, unified_size).
        """
        self._check_input(x)
        k = self._check_path(k)
        check_protocol(protocol)
        if protocol == "upsample":
            x = resize_images(x, self.scales[k])
        return self.unify(self.subnets[k](x))

    def forward_features(
        self, x: torch.Tensor, k: int | None = None, *, protocol: Protocol = "upsample"
    ) -> torch.Tensor:
        """The trunk's output (B, C', h', w') for path k (None: the routed path).

        Args:
            x: Images (B, 3, H, W).
            k: Path index; None routes by max(H, W).
            protocol: ``upsample`` (resized to the path's nominal size) or ``native``.
        """
        if k is None:
            self._check_input(x)
            k = self.route(max(x.shape[-2:]))
        return self.forward_trunk(self.forward_subnet(x, k, protocol=protocol), k)

    def forward_trunk(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """The trunk (B, C', h', w') on path k's unified subnet output z (B, C, u, u).

        A private-BatchNorm trunk uses path k's set; a shared one is the plain trunk.
        """
        if self.bn == "shared":
            return self.trunk(z)  # type: ignore[no-any-return]
        with use_bn_set(self.trunk, k):
            return self.trunk(z)  # type: ignore[no-any-return]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from trunk features (B, C', h', w')."""
        return self.head(features)  # type: ignore[no-any-return]

    def forward_path(
        self, x: torch.Tensor, k: int, *, protocol: Protocol = "upsample"
    ) -> torch.Tensor:
        """Logits (B, num_classes) of path k; see :meth:`forward_features` for ``protocol``."""
        return self.forward_head(self.forward_features(x, k, protocol=protocol))

    def forward(self, x: torch.Tensor, *, protocol: Protocol = "upsample") -> torch.Tensor:
        """Logits (B, num_classes) of the path routed by the input size max(H, W)."""
        return self.forward_head(self.forward_features(x, protocol=protocol))

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every path on x resized to its nominal size, for training.

        The trunk runs once per path (not on a concatenation), so the shared BatchNorm layers
        see each path's batch separately, as in the authors' code (a private trunk uses path
        k's set for path k).

        Args:
            x: Images (B, 3, H, W), typically 224-pixel crops.

        Returns:
            zs: Per path, the unified subnet output (B, C, unified_size, unified_size).
            logits: Per path, (B, num_classes).
        """
        zs = [self.forward_subnet(x, k) for k in range(self.num_paths)]
        return zs, [self.forward_head(self.forward_trunk(z, k)) for k, z in enumerate(zs)]

    @staticmethod
    def canonical_name(name: str) -> str:
        """The torchvision name of a module or parameter of any path.

        ``subnets.1.layer1.0.conv1`` -> ``layer1.0.conv1``, ``trunk.features.24`` ->
        ``features.24``, ``head.fc.weight`` -> ``fc.weight``; a part's root maps to "".

        Raises:
            InputError: ``name`` is not inside ``subnets``, ``trunk`` or ``head``.
        """
        match = _PART.match(name)
        if match is None:
            raise InputError(
                f"{name!r} is not a module of an MSUN. Hint: names start with 'subnets.K.', "
                "'trunk.' or 'head.'"
            )
        return name[match.end() :]

    @staticmethod
    def path_of(name: str) -> int | None:
        """The subnet index of a module or parameter name; None for shared ones (trunk, head)."""
        match = _PART.match(name)
        return int(match.group(1)) if match and match.group(1) is not None else None


def build_msun(
    arch: str,
    *,
    split_at: str | None = None,
    scales: Sequence[int] = (32, 128, 224),
    num_classes: int = 1000,
    weights: str | None = None,
    routing: Sequence[int] | None = None,
    bn: str = "shared",
) -> MSUN:
    """Builds an MSUN on a torchvision backbone.

    Args:
        arch: A supported torchvision model name (see ``msun.supported_archs()``).
        split_at: First stage of the shared trunk (see ``msun.split_points(arch)``); None for
            the published default.
        scales: Nominal input size of each subnet, 2 to 5 strictly increasing positive ints.
        num_classes: Output classes (at least 2).
        weights: None/"none" for random init; "imagenet"/"default" or a torchvision weights
            enum name for a pretrained vanilla model (pretrained needs its number of classes).
        routing: Upper bounds (inclusive) of the input sizes of paths 0..K-2, strictly
            increasing; None routes each input to the smallest nominal size >= its size.
        bn: "shared" (the published MSUN) or "private": one BatchNorm set per path in the
            trunk, each a copy of the vanilla layer's starting state.

    Returns:
        The model in training mode, on the default device.

    Raises:
        InputError: An unsupported arch, illegal split point, bad scales/routing/num_classes.
        WeightsUnavailableError: Pretrained weights are not cached and cannot be downloaded.
    """
    backbone = backbone_for(arch)
    scale_tuple = check_scales(scales)
    route_tuple = check_routing(routing, scale_tuple)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    vanilla = _vanilla(arch, weights, num_classes)
    if split_at is None:
        split_at = recipe_for(arch).default_split
    split = check_split(backbone, vanilla, arch, split_at)
    parts = backbone.split(vanilla, split)
    # Each smaller subnet from its own model, built after the largest path's: with the same
    # seed the largest path starts exactly as a vanilla network.
    smaller = [
        backbone.split(_vanilla(arch, weights, num_classes), split).shallow
        for _ in scale_tuple[:-1]
    ]
    model = MSUN(
        arch=arch,
        split_at=split,
        scales=scale_tuple,
        routing=route_tuple,
        subnets=make_subnets(backbone, [*smaller, parts.shallow], scale_tuple),
        trunk=parts.trunk,
        head=parts.head,
        bn=bn,
    )
    return model.train()


@functools.lru_cache(maxsize=16)
def check_structure(arch: str, split_at: str | None, scales: tuple[int, ...], bn: str) -> None:
    """Builds that MSUN on the meta device, so that its own checks run.

    They check the split point, the scales, each subnet at its nominal size
    (``MSUN._output_size``) and a private-BN trunk. Shapes only, no memory; a structure found
    good is not built again in this process.

    Raises:
        InputError: As ``build_msun``.
    """
    with torch.device("meta"):
        build_msun(arch, split_at=split_at, scales=scales, bn=bn)


def weights_name(weights: str | None) -> str:
    """``weights`` as ckascope names them: None is "none", build_msun's "imagenet" "default"."""
    if weights is None:
        return "none"
    return "default" if weights.lower() == "imagenet" else weights


def _vanilla(arch: str, weights: str | None, num_classes: int) -> nn.Module:
    """The torchvision model: pretrained via ckascope (fails fast offline) or random init."""
    weights = weights_name(weights)
    if weights.lower() == "none":
        # Global RNG, as for any nn.Module: torch.manual_seed controls the initialisation.
        model: nn.Module = torchvision.models.get_model(arch, num_classes=num_classes)
        return model
    return build_model(arch, weights, num_classes=num_classes)


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Validates nominal sizes: 2..5 strictly increasing ints in 1..MAX_SCALE (the test sizes').

    Raises:
        InputError: Otherwise, saying what a legal value looks like.
    """
    values = tuple(scales)
    legal = (
        2 <= len(values) <= MAX_SUBNETS
        and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_SCALE for s in values
        )
        and all(a < b for a, b in itertools.pairwise(values))
    )
    if not legal:
        raise InputError(
            f"bad scales {list(values)}. Hint: give 2 to {MAX_SUBNETS} distinct positive "
            f"integers up to {MAX_SCALE} in increasing order, e.g. 32 128 224 (the published "
            "subnets)"
        )
    return values


def check_routing(routing: Sequence[int] | None, scales: tuple[int, ...]) -> tuple[int, ...]:
    """The routing table: K-1 strictly increasing positive upper bounds (default scales[:-1]).

    Raises:
        InputError: Wrong length, order or values.
    """
    if routing is None:
        return scales[:-1]
    values = tuple(routing)
    legal = (
        len(values) == len(scales) - 1
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in values)
        and all(a < b for a, b in itertools.pairwise(values))
    )
    if not legal:
        raise InputError(
            f"bad routing {list(values)} for scales {list(scales)}. Hint: give {len(scales) - 1} "
            "increasing upper bounds (path k serves sizes <= bound k, the last path the rest), "
            f"e.g. {list(scales[:-1])}"
        )
    return values
