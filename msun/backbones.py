"""Per-family adapters: split a torchvision classifier into shallow part, trunk and head.

An adapter knows, for one family of torchvision models, where the shared trunk may start (the
legal ``split_at`` values, in forward order), how to cut the model there without renaming any
module, and how to remove early down-sampling from a copy of the shallow part for a smaller
nominal input (the *stem rule*).

The stem rule: let ``D`` be the number of stride-2 down-samplings in the rule's scope at the
largest scale (ResNet/DenseNet: the stem conv and max-pool; VGG: the max-pools of the shallow
part; MobileNetV2: the stem conv and the stride-2 blocks of the shallow part) and ``S = 2**D``.
A subnet of nominal size ``s`` keeps a total stride ``t = clip(2**round(log2(S * s / s_max)), 1,
S)`` and so removes ``m = log2(S / t)`` down-samplings. With the published scales (32, 128, 224)
this gives exactly the structures of the authors' code (docs/msun.md); it extends them to any
2 to 5 scales and any split point.
"""

from __future__ import annotations

import difflib
import functools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ckascope.platform import MAX_SCALE, InputError

RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
DENSENETS = ("densenet121", "densenet161", "densenet169", "densenet201")
VGGS = tuple(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn"))
MOBILENETS = ("mobilenet_v2",)


class Head(nn.Module):
    """Pooling and classifier of a torchvision model, under torchvision's module names.

    Reproduces the functional tail of each family's ``forward``: DenseNet's ReLU after
    ``norm5``, and adaptive average pooling where torchvision has no pooling module.
    """

    def __init__(
        self,
        classifier_name: str,
        classifier: nn.Module,
        *,
        avgpool: nn.Module | None = None,
        relu_first: bool = False,
    ) -> None:
        super().__init__()
        if avgpool is not None:
            self.avgpool = avgpool
        self.add_module(classifier_name, classifier)
        self.classifier_name = classifier_name
        self.relu_first = relu_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps trunk features (B, C, h, w) to logits (B, num_classes)."""
        if self.relu_first:
            x = F.relu(x)  # not in place: forward_features' output stays unmodified
        x = self.avgpool(x) if hasattr(self, "avgpool") else F.adaptive_avg_pool2d(x, 1)
        classifier: nn.Module = getattr(self, self.classifier_name)
        return classifier(torch.flatten(x, 1))  # type: ignore[no-any-return]


def classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the classifier: the last linear layer, in every supported family."""
    name, module = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert isinstance(module, nn.Linear)
    return name, module


@dataclass
class Parts:
    """A torchvision model cut at ``split_at``; all three share the model's modules."""

    shallow: nn.Sequential
    trunk: nn.Sequential
    head: Head


def _children(module: nn.Module, names: Sequence[str]) -> nn.Sequential:
    """A Sequential holding ``module``'s children ``names`` under their own names."""
    return nn.Sequential(OrderedDict((n, module.get_submodule(n)) for n in names))


def _features_split(features: nn.Sequential, index: int) -> tuple[nn.Sequential, nn.Sequential]:
    """``features[:index]`` and ``features[index:]``, each wrapped as ``features`` (keys kept)."""
    shallow = nn.Sequential(OrderedDict(features=features[:index]))
    trunk = nn.Sequential(OrderedDict(features=features[index:]))
    return shallow, trunk


def _replace_conv(parent: nn.Module, name: str, kernel: int, padding: int) -> None:
    """Makes ``parent.name`` a stride-1 conv; a changed kernel size means a new conv.

    A conv whose kernel size is unchanged keeps its (fresh) weights; a new one keeps
    ``nn.Conv2d``'s own default initialisation, as in the authors' modules.
    """
    old = parent.get_submodule(name)
    assert isinstance(old, nn.Conv2d)
    if old.kernel_size == (kernel, kernel):
        old.stride, old.padding = (1, 1), (padding, padding)
        return
    new = nn.Conv2d(
        old.in_channels,
        old.out_channels,
        kernel,
        stride=1,
        padding=padding,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    parent.register_module(name, new)


class Backbone(ABC):
    """Adapter for one family of torchvision classifiers."""

    family: str
    archs: tuple[str, ...]

    @abstractmethod
    def split_points(self, model: nn.Module) -> list[str]:
        """Legal ``split_at`` values for ``model``, in forward order."""

    @abstractmethod
    def split(self, model: nn.Module, split_at: str) -> Parts:
        """Cuts ``model`` so that the trunk starts at ``split_at`` (a legal split point)."""

    @abstractmethod
    def downsamplings(self, shallow: nn.Sequential) -> int:
        """D: the stride-2 down-samplings of ``shallow`` in the stem rule's scope."""

    @abstractmethod
    def remove_downsamplings(self, shallow: nn.Sequential, m: int) -> None:
        """Removes the first ``m`` (0 < m <= D) down-samplings of ``shallow`` in place."""


class ResNetBackbone(Backbone):
    """ResNet, ResNeXt and Wide-ResNet: ``conv1 bn1 relu maxpool layer1..4 avgpool fc``."""

    family = "resnet"
    archs = RESNETS
    stem = ("conv1", "bn1", "relu", "maxpool")
    stages = ("layer1", "layer2", "layer3", "layer4")

    def split_points(self, model: nn.Module) -> list[str]:  # noqa: D102
        return list(self.stages)

    def split(self, model: nn.Module, split_at: str) -> Parts:  # noqa: D102
        index = self.stages.index(split_at)
        return Parts(
            shallow=_children(model, self.stem + self.stages[:index]),
            trunk=_children(model, self.stages[index:]),
            head=Head("fc", model.get_submodule("fc"), avgpool=model.get_submodule("avgpool")),
        )

    def downsamplings(self, shallow: nn.Sequential) -> int:  # noqa: D102
        return 2  # conv1 (stride 2) and maxpool (stride 2)

    def remove_downsamplings(self, shallow: nn.Sequential, m: int) -> None:  # noqa: D102
        _shrink_stem(shallow, "conv1", "maxpool", m)


class DenseNetBackbone(Backbone):
    """DenseNet: ``features.{conv0 norm0 relu0 pool0 denseblock1 transition1 ... norm5}``."""

    family = "densenet"
    archs = DENSENETS
    blocks = ("denseblock1", "denseblock2", "denseblock3", "denseblock4")

    def split_points(self, model: nn.Module) -> list[str]:  # noqa: D102
        return list(self.blocks)

    def split(self, model: nn.Module, split_at: str) -> Parts:  # noqa: D102
        features = model.get_submodule("features")
        assert isinstance(features, nn.Sequential)
        index = [n for n, _ in features.named_children()].index(split_at)
        shallow, trunk = _features_split(features, index)
        head = Head("classifier", model.get_submodule("classifier"), relu_first=True)
        return Parts(shallow, trunk, head)

    def downsamplings(self, shallow: nn.Sequential) -> int:  # noqa: D102
        return 2  # conv0 (stride 2) and pool0 (stride 2)

    def remove_downsamplings(self, shallow: nn.Sequential, m: int) -> None:  # noqa: D102
        _shrink_stem(shallow.get_submodule("features"), "conv0", "pool0", m)


def _shrink_stem(stem: nn.Module, conv: str, pool: str, m: int) -> None:
    """ResNet-style stems: m=1 -> conv 5x5/1 pad 2 + max-pool; m=2 -> conv 3x3/1 pad 2, no pool.

    The pool is replaced by ``nn.Identity`` under the same name so layer names stay aligned.
    """
    _replace_conv(stem, conv, kernel=5 if m == 1 else 3, padding=2)
    if m >= 2:
        stem.register_module(pool, nn.Identity())


def _sequential_features(model: nn.Module) -> nn.Sequential:
    features = model.get_submodule("features")
    assert isinstance(features, nn.Sequential)
    return features


class VGGBackbone(Backbone):
    """VGG with or without BN: ``features.N avgpool classifier``; splits after max-pools."""

    family = "vgg"
    archs = VGGS

    def split_points(self, model: nn.Module) -> list[str]:  # noqa: D102
        features = _sequential_features(model)
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        return [f"features.{i + 1}" for i in pools if i + 1 < len(features)]

    def split(self, model: nn.Module, split_at: str) -> Parts:  # noqa: D102
        shallow, trunk = _features_split(_sequential_features(model), _index(split_at))
        head = Head(
            "classifier", model.get_submodule("classifier"), avgpool=model.get_submodule("avgpool")
        )
        return Parts(shallow, trunk, head)

    def downsamplings(self, shallow: nn.Sequential) -> int:  # noqa: D102
        return len(self._pools(shallow))

    def remove_downsamplings(self, shallow: nn.Sequential, m: int) -> None:  # noqa: D102
        features = shallow.get_submodule("features")
        for index in self._pools(shallow)[-m:]:  # the last m pools, as published for S2
            features.register_module(str(index), nn.MaxPool2d(2, stride=1))

    @staticmethod
    def _pools(shallow: nn.Sequential) -> list[int]:
        features = shallow.get_submodule("features")
        return [i for i, m in enumerate(features.children()) if isinstance(m, nn.MaxPool2d)]


class MobileNetV2Backbone(Backbone):
    """MobileNetV2: ``features.0`` (stem) ``features.1..17`` (blocks) ``features.18 classifier``."""

    family = "mobilenet_v2"
    archs = MOBILENETS

    def split_points(self, model: nn.Module) -> list[str]:  # noqa: D102
        return [f"features.{i}" for i in range(1, len(_sequential_features(model)))]

    def split(self, model: nn.Module, split_at: str) -> Parts:  # noqa: D102
        shallow, trunk = _features_split(_sequential_features(model), _index(split_at))
        return Parts(shallow, trunk, Head("classifier", model.get_submodule("classifier")))

    def downsamplings(self, shallow: nn.Sequential) -> int:  # noqa: D102
        return 1 + len(self._strided_convs(shallow))

    def remove_downsamplings(self, shallow: nn.Sequential, m: int) -> None:
        """m=1: stem conv 3x3/1; m>=2: stem conv 1x1/1 and the next m-1 blocks at stride 1."""
        stem = shallow.get_submodule("features.0")
        _replace_conv(stem, "0", kernel=3 if m == 1 else 1, padding=1 if m == 1 else 0)
        for block, conv in self._strided_convs(shallow)[: m - 1]:
            conv.stride = (1, 1)
            block.stride = 1  # type: ignore[assignment]

    @staticmethod
    def _strided_convs(shallow: nn.Sequential) -> list[tuple[nn.Module, nn.Conv2d]]:
        """(block, depthwise conv) of every stride-2 inverted-residual block, in forward order."""
        blocks = list(shallow.get_submodule("features").children())[1:]
        return [
            (block, conv)
            for block in blocks
            for conv in block.modules()
            if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2)
        ]


def _index(split_at: str) -> int:
    """The N of ``features.N``."""
    return int(split_at.rpartition(".")[2])


BACKBONES: tuple[Backbone, ...] = (
    ResNetBackbone(),
    DenseNetBackbone(),
    VGGBackbone(),
    MobileNetV2Backbone(),
)


def supported_archs() -> tuple[str, ...]:
    """Names of the torchvision models MSUN can be built on."""
    return tuple(arch for backbone in BACKBONES for arch in backbone.archs)


def backbone_for(arch: str) -> Backbone:
    """The adapter of ``arch``.

    Raises:
        InputError: ``arch`` is not supported (the message names the closest supported ones).
    """
    for backbone in BACKBONES:
        if arch in backbone.archs:
            return backbone
    close = difflib.get_close_matches(arch, supported_archs(), n=3, cutoff=0.6)
    guess = f"did you mean {', '.join(close)}? " if close else ""
    raise InputError(
        f"unknown architecture {arch!r}. Hint: {guess}supported: {', '.join(supported_archs())}"
    )


def meta_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """The vanilla torchvision model on the meta device: structure only, no memory, no init."""
    backbone_for(arch)
    with torch.device("meta"):
        model: nn.Module = torchvision.models.get_model(arch, num_classes=num_classes)
    return model


def accepts(run: Callable[[torch.Tensor], object], side: int) -> bool:
    """Whether ``run`` takes one (1, 3, side, side) image: a shape-only pass on the meta device.

    ``run`` must hold meta tensors (``meta_model``, or a model built under ``torch.device("meta")``)
    and be in eval mode: BatchNorm in training mode refuses one value per channel, which a
    training batch (two images or more per process) never is.
    """
    x = torch.empty(1, 3, side, side, device="meta")
    try:
        with torch.no_grad():
            run(x)
    except RuntimeError:  # a pooling or convolution left with less than one pixel
        return False
    return True


def smallest_side(run: Callable[[torch.Tensor], object]) -> int:
    """The smallest image side in 1..MAX_SCALE that ``run`` takes (see ``accepts``).

    A feature map never grows when its input shrinks, so every larger side works too: a
    bisection, a dozen shape-only passes.
    """
    low, high = 1, MAX_SCALE
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if accepts(run, middle) else (middle + 1, high)
    return low


@functools.lru_cache(maxsize=32)
def smallest_image(arch: str) -> int:
    """The smallest image side ``arch``'s vanilla network (an MSUN's largest path) runs at.

    1 for ResNets and MobileNetV2 (padded convolutions keep a pixel), 32 for VGG (five 2x2
    max-pools), 29 for DenseNet (its transitions' 2x2 average pools).
    """
    return smallest_side(meta_model(arch).eval())


@functools.lru_cache(maxsize=32)
def too_small(arch: str, side: int) -> int | None:
    """``smallest_image(arch)`` when ``side`` is below it, else None (one pass when it fits)."""
    return None if accepts(meta_model(arch).eval(), side) else smallest_image(arch)


def split_points(arch: str) -> list[str]:
    """Legal ``split_at`` values of ``arch`` (the first stage of the shared trunk), in order.

    Raises:
        InputError: ``arch`` is not supported.
    """
    return backbone_for(arch).split_points(meta_model(arch))


def check_split(backbone: Backbone, model: nn.Module, arch: str, split_at: str) -> str:
    """``split_at`` once checked legal for ``model`` (the published default is the recipe's).

    Raises:
        InputError: ``split_at`` is not a legal split point (the message lists them).
    """
    legal = backbone.split_points(model)
    if split_at not in legal:
        raise InputError(
            f"{split_at!r} is not a split point of {arch}. Hint: choose one of "
            f"{', '.join(legal)} (the first stage of the shared trunk)"
        )
    return split_at


def stem_reductions(scales: Sequence[int], downsamplings: int) -> list[int]:
    """How many down-samplings each subnet removes (m_k), by its size's ratio to the largest.

    Args:
        scales: Nominal input sizes, ascending.
        downsamplings: D, the stride-2 steps in the stem rule's scope at the largest scale.

    Returns:
        m_k in [0, D] per scale; 0 for the largest.
    """
    total = 2**downsamplings
    removed = []
    for scale in scales:
        exponent = round(math.log2(total * scale / scales[-1]))
        kept = min(max(exponent, 0), downsamplings)  # t_k = 2**kept, clipped to [1, S]
        removed.append(downsamplings - kept)
    return removed


def make_subnets(
    backbone: Backbone, shallows: Sequence[nn.Sequential], scales: Sequence[int]
) -> nn.ModuleList:
    """One subnet per scale from its own shallow part; all but the largest lose down-samplings.

    Args:
        backbone: The family's adapter.
        shallows: One shallow part per scale, each cut from its own model (the authors build
            every subnet from a freshly initialised model, so no two start with equal weights).
        scales: Nominal sizes, ascending; the last subnet stays as it is.
    """
    reductions = stem_reductions(scales, backbone.downsamplings(shallows[-1]))
    for shallow, m in zip(shallows, reductions, strict=True):
        if m > 0:
            backbone.remove_downsamplings(shallow, m)
    return nn.ModuleList(shallows)
