"""Layer selection: module names, glob patterns, predicates and the presets blocks/stages/leaves.

Presets work on any torchvision CNN and on containers of them (such as a multi-path model):

- ``blocks``: the stem output and every block output (residual, dense block and transition,
  inverted-residual, ConvNeXt/EfficientNet/RegNet/ViT/Swin blocks, ...); for plain networks
  without blocks (VGG, AlexNet) every ReLU after a convolution. ResNet-50 gives 17 layers,
  ResNet-18 gives 9.
- ``stages``: the stem and the output of every stage (ResNet ``layer1``..``layer4``, DenseNet
  dense blocks, the last block of each resolution for MobileNetV2, every max-pool for VGG).
- ``leaves``: every module without children.

The stem is the module that runs just before the first block: the sibling before the first
block's container (``maxpool`` for ResNet, ``features.pool0`` for DenseNet, ``features.0`` for
MobileNetV2).
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Callable, Sequence

from torch import nn

from ckascope.errors import InputError, hint_close

LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], bool]
PRESETS = ("blocks", "stages", "leaves")

#: Class names of the block modules of torchvision's classification models.
BLOCK_CLASSES = frozenset(
    {
        "BasicBlock",
        "Bottleneck",
        "InvertedResidual",
        "_InvertedResidual",
        "_DenseBlock",
        "_Transition",
        "CNBlock",
        "MBConv",
        "FusedMBConv",
        "ResBottleneckBlock",
        "EncoderBlock",
        "SwinTransformerBlock",
        "SwinTransformerBlockV2",
        "Fire",
        "Inception",
        "InceptionA",
        "InceptionB",
        "InceptionC",
        "InceptionD",
        "InceptionE",
        "MaxVitBlock",
    }
)

Named = list[tuple[str, nn.Module]]


def list_presets() -> tuple[str, ...]:
    """The names of the layer presets."""
    return PRESETS


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in BLOCK_CLASSES


def _outermost_blocks(named: Named) -> list[str]:
    """Block modules not nested in another block (a _DenseBlock's layers are not blocks)."""
    picked: list[str] = []
    for name, module in named:
        if _is_block(module) and not any(name.startswith(p + ".") for p in picked):
            picked.append(name)
    return picked


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _stems(model: nn.Module, blocks: list[str]) -> list[str]:
    """The module run just before each chain of blocks (one per path of a multi-path model).

    A block's stem is the sibling registered before it (climbing past first children), unless
    that sibling is or holds a block, in which case the block continues a chain.
    """
    stems = []
    for block in blocks:
        previous = _previous_sibling(model, block)
        if previous is not None and not _holds_block(model.get_submodule(previous)):
            stems.append(previous)
    return stems


def _holds_block(module: nn.Module) -> bool:
    return any(_is_block(m) for m in module.modules())


def _previous_sibling(model: nn.Module, name: str) -> str | None:
    """The child registered just before ``name`` in its parent, climbing up past first children."""
    while name:
        parent_name = _parent(name)
        parent = model.get_submodule(parent_name) if parent_name else model
        children = [n for n, _ in parent.named_children()]
        index = children.index(name.rpartition(".")[2])
        if index > 0:
            return f"{parent_name}.{children[index - 1]}" if parent_name else children[index - 1]
        name = parent_name
    return None


def _plain_relus(named: Named) -> list[str]:
    """ReLUs that directly follow a convolution (or its BatchNorm), for networks without blocks."""
    picked, after_conv = [], False
    for name, module in named:
        if isinstance(module, nn.Conv2d):
            after_conv = True
        elif isinstance(module, nn.ReLU) and after_conv:
            picked.append(name)
            after_conv = False
    return picked


def _stage_ends(model: nn.Module, blocks: list[str]) -> list[str]:
    """Stage outputs: ``layerN``-style containers, dense blocks, or the last block per stride."""
    parents = {_parent(b) for b in blocks}
    if all(re.search(r"(^|\.)layer\d+$", p) for p in parents):
        return _ordered(parents, blocks)
    named = dict(model.named_modules())
    if any(type(named[b]).__name__ == "_DenseBlock" for b in blocks):
        return [b for b in blocks if type(named[b]).__name__ == "_DenseBlock"]
    ends = [b for b, nxt in itertools.pairwise(blocks) if _downsamples(named[nxt])]
    return [*ends, blocks[-1]] if blocks else []


def _ordered(parents: set[str], blocks: list[str]) -> list[str]:
    return sorted(parents, key=lambda p: min(i for i, b in enumerate(blocks) if _parent(b) == p))


def _downsamples(module: nn.Module) -> bool:
    stride = getattr(module, "stride", None)
    if stride is None:
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        stride = max((max(c.stride) for c in convs), default=1)
    return bool(stride != 1 and stride != (1, 1))


def preset_layers(model: nn.Module, preset: str) -> list[str]:
    """Module names of a preset ("blocks", "stages" or "leaves") in registration order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if preset == "leaves":
        return [n for n, m in named if not any(True for _ in m.children())]
    blocks = _outermost_blocks(named)
    if not blocks:
        relus = _plain_relus(named)
        if preset == "blocks":
            return relus
        return [n for n, m in named if isinstance(m, nn.MaxPool2d)]
    stems = _stems(model, blocks)
    chosen = blocks if preset == "blocks" else _stage_ends(model, blocks)
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(set(stems) | set(chosen), key=order.__getitem__)


def resolve_layers(model: nn.Module, spec: LayerSpec = "blocks") -> list[str]:
    """Turns a layer specification into module names in the model's registration order.

    Args:
        model: The network.
        spec: A preset name, a module name, a glob pattern (``layer*.0``), a sequence of those,
            or a predicate ``(name, module) -> bool``.

    Returns:
        The selected module names, each once.

    Raises:
        InputError: A name that does not exist (with close matches), a pattern or predicate
            that matches nothing, or an empty selection.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if callable(spec):
        picked = [n for n, m in named if spec(n, m)]
        if not picked:
            raise InputError("the layer predicate matched no module of the model")
        return picked
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise InputError("no layers given. Hint: use a preset such as 'blocks'")
    names = [n for n, _ in named]
    picked_set: set[str] = set()
    for item in specs:
        picked_set.update(_match(model, item, names))
    return [n for n in names if n in picked_set]


def _match(model: nn.Module, item: str, names: list[str]) -> list[str]:
    if item in PRESETS:
        found = preset_layers(model, item)
        if not found:
            raise InputError(
                f"preset {item!r} found no layers in {type(model).__name__}. "
                "Hint: pass module names or glob patterns instead"
            )
        return found
    if any(c in item for c in "*?["):
        found = fnmatch.filter(names, item)
        if not found:
            sample = ", ".join(n for n in names if "." not in n)
            raise InputError(
                f"layer pattern {item!r} matches no module. Hint: top-level modules are {sample}"
            )
        return found
    if item not in names:
        raise InputError(hint_close(item, names, what="layer"))
    return [item]
