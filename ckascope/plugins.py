"""Model families plug into ckascope through Python entry points.

That is how third-party packages extend a registry without the registry knowing them: ckascope
names no family but its own (torchvision). A package that builds models of its own declares, in
its ``pyproject.toml``:

    [project.entry-points."ckascope.model_builders"]
    myfamily = "mypackage.checkpoint:model_from_config"   # config -> nn.Module (with an
                                                          # optional describe() -> str)

    [project.entry-points."ckascope.split_vocabularies"]
    myfamily = "mypackage.splits:split_vocabulary"       # (arch, scales) -> list[SplitCandidate],
                                                          # costs for those compared scales, or
                                                          # None for an arch it does not split

A self-describing checkpoint names its builder (``{"format": "ckascope-model", "builder":
"myfamily", ...}``); names in files or on the command line select a registered entry, never
arbitrary code. Entries are imported only when used, so the dependency arrow runs from the family
to ckascope. ``register`` adds an entry in code (a package used without being installed, tests).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Literal

from ckascope.errors import InputError

Group = Literal["model_builders", "split_vocabularies"]

#: ckascope's own entries; every other family comes from entry points or ``register``.
_BUILTIN: dict[Group, dict[str, str]] = {
    "model_builders": {"torchvision": "ckascope.models:model_from_config"},
    "split_vocabularies": {},
}
_REGISTERED: dict[Group, dict[str, Callable[..., Any] | str]] = {
    "model_builders": {},
    "split_vocabularies": {},
}


def register(
    group: Group, name: str, target: Callable[..., Any] | str, *, replace: bool = False
) -> None:
    """Adds a function, or a "module:function" imported when first used, to ``group``.

    Registering the same target again changes nothing (a package that registers itself on
    import, and is also installed with the same entry point).

    Raises:
        InputError: ``name`` is ckascope's own, or already names another target in the group
            (installed or registered) and ``replace`` is False: a silent replacement would
            change what every checkpoint of that family loads.
    """
    if name in _BUILTIN[group]:
        raise InputError(f"{name!r} is ckascope's own {group} entry and cannot be replaced")
    current = {**_installed(group), **_REGISTERED[group]}.get(name)
    if current is not None and current != target and not replace:
        raise InputError(
            f"{group} already has an entry {name!r} ({current!r}). Hint: choose another name, "
            "or pass replace=True to replace it"
        )
    _REGISTERED[group][name] = target


def _installed(group: Group) -> dict[str, str]:
    """The entry points installed packages declare for ``group``: name -> "module:function"."""
    return {ep.name: ep.value for ep in entry_points(group=f"ckascope.{group}")}


def list_entries(group: Group) -> list[str]:
    """Names registered in ``group``: built in, installed, or registered in code."""
    return sorted({*_BUILTIN[group], *_installed(group), *_REGISTERED[group]})


def load(group: Group, name: str) -> Callable[..., Any]:
    """The function registered under ``name`` in ``group``, imported now.

    Raises:
        InputError: ``name`` is not registered, or its package cannot be imported.
    """
    # ckascope's own entries win over an installed package that reuses their names
    target = {**_installed(group), **_REGISTERED[group], **_BUILTIN[group]}.get(name)
    if callable(target):
        return target
    if target is None:
        raise InputError(
            f"nothing named {name!r} in ckascope's {group}; known: "
            f"{', '.join(list_entries(group)) or 'none'}. Hint: install the package that "
            "provides it (pip install -e . in its folder)"
        )
    return _import(name, target)


def _import(name: str, target: str) -> Callable[..., Any]:
    """The function ``"module:function"`` names, or an InputError saying what is missing."""
    module_name, _, func = target.partition(":")
    try:
        loaded: Callable[..., Any] = getattr(importlib.import_module(module_name), func)
    except (ImportError, AttributeError) as e:
        raise InputError(
            f"{name} points at {target}, which cannot be loaded ({e}). Hint: reinstall the "
            f"package that provides it (pip install -e . in its folder)"
        ) from e
    return loaded
