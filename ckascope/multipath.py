"""Multi-path models: every input scale runs through its own path.

ckascope recognises them by their methods (``is_multipath``), not by their package. A path's
layers are addressed by their canonical names, the vanilla model's names (``layer1.0`` for
``subnets.2.layer1.0`` and for ``subnets.0.layer1.0``), so a cross-scale comparison lines up
the same layer role in two different paths.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast, runtime_checkable
from typing import Protocol as Interface

from torch import Tensor, nn

from ckascope.errors import InputError
from ckascope.vocab import Protocol


@runtime_checkable
class MultiPathModel(Interface):
    """What ckascope needs from a multi-path model."""

    num_paths: int

    def route(self, size: int) -> int:
        """The path serving inputs of ``size``."""

    def forward_path(self, x: Tensor, k: int, *, protocol: Protocol = "upsample") -> Tensor:
        """Logits of path k (input resized to its nominal size under ``upsample``)."""

    @staticmethod
    def canonical_name(name: str) -> str:
        """The vanilla model's name of a module of any path."""

    @staticmethod
    def path_of(name: str) -> int | None:
        """The path a module belongs to; None for shared modules."""


def is_multipath(model: Any) -> bool:
    """Whether ``model`` routes inputs through per-scale paths."""
    return isinstance(model, nn.Module) and isinstance(model, MultiPathModel)


class PathView(nn.Module):
    """Path k of a multi-path model under canonical names; it shares, not copies, the modules.

    Containers split between a path's own part and the shared part (VGG's ``features``) are
    joined into one ``nn.Sequential`` so the vanilla model's names resolve (presets included).
    The view is for addressing layers: the model's own ``forward_path`` runs them.
    """

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        paths = cast(MultiPathModel, model)
        if not 0 <= k < paths.num_paths:
            raise InputError(f"path {k} does not exist (the model has {paths.num_paths} paths)")
        groups: dict[str, list[nn.Module]] = {}
        for name, module in model.named_modules():
            if name and paths.path_of(name) in (k, None):
                canonical = paths.canonical_name(name)
                if canonical and "." not in canonical:
                    groups.setdefault(canonical, []).append(module)
        for name, parts in groups.items():
            self.add_module(name, parts[0] if len(parts) == 1 else _joined(parts))


def _joined(parts: list[nn.Module]) -> nn.Sequential:
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for part in parts:
        for name, child in part.named_children():
            if name in children:
                raise InputError(f"two parts of one path both hold a module named {name!r}")
            children[name] = child
    return nn.Sequential(children)
