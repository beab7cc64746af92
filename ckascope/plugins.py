"""Named entry points that ckascope imports only when it needs them.

ckascope never imports msun at import time (the dependency arrow is msun -> ckascope), yet
reads msun checkpoints and msun's split-point vocabulary. Both go through this fixed table:
names in files or on the command line select an entry, never arbitrary code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ckascope.errors import InputError

ENTRY_POINTS: dict[str, str] = {
    "builder:msun": "msun.checkpoint:model_from_config",
    "builder:torchvision": "ckascope.models:model_from_config",
    "split_candidates": "msun.splits:split_candidates",
}


def load(name: str) -> Callable[..., Any]:
    """The function registered under ``name``, imported now.

    Raises:
        InputError: ``name`` is not registered, or its package is not installed.
    """
    if name not in ENTRY_POINTS:
        raise InputError(f"unknown entry point {name!r}; known: {', '.join(ENTRY_POINTS)}")
    module_name, _, func = ENTRY_POINTS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(
            f"{name} needs the {module_name.split('.')[0]} package ({e}). Hint: pip install -e ."
        ) from e
    loaded: Callable[..., Any] = getattr(module, func)
    return loaded
