"""ckascope: layer-by-layer CKA of CNNs across input scales and across models.

The public names load on first use (PEP 562), so ``import ckascope`` is instant and the command
line can take over Ctrl-C before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ActivationRecorder": "ckascope.recorder",
    "CKAResult": "ckascope.result",
    "CKAScopeError": "ckascope.errors",
    "InputError": "ckascope.errors",
    "MinibatchCKA": "ckascope.metric",
    "NumericalError": "ckascope.errors",
    "SideSpec": "ckascope.compare",
    "SplitCandidate": "ckascope.split",
    "SweepOptions": "ckascope.compare",
    "ViewOptions": "ckascope.views",
    "WeightsUnavailableError": "ckascope.errors",
    "cka": "ckascope.functional",
    "cka_matrix": "ckascope.functional",
    "compare_models": "ckascope.compare",
    "compare_scales": "ckascope.compare",
    "compare_sides": "ckascope.compare",
    "list_presets": "ckascope.layers",
    "resolve_layers": "ckascope.layers",
    "suggest_split": "ckascope.split",
}

__all__ = [
    "ActivationRecorder",
    "CKAResult",
    "CKAScopeError",
    "InputError",
    "MinibatchCKA",
    "NumericalError",
    "SideSpec",
    "SplitCandidate",
    "SweepOptions",
    "ViewOptions",
    "WeightsUnavailableError",
    "__version__",
    "cka",
    "cka_matrix",
    "compare_models",
    "compare_scales",
    "compare_sides",
    "list_presets",
    "resolve_layers",
    "suggest_split",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ckascope' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from ckascope.compare import (
        SideSpec,
        SweepOptions,
        compare_models,
        compare_scales,
        compare_sides,
    )
    from ckascope.errors import CKAScopeError, InputError, NumericalError, WeightsUnavailableError
    from ckascope.functional import cka, cka_matrix
    from ckascope.layers import list_presets, resolve_layers
    from ckascope.metric import MinibatchCKA
    from ckascope.recorder import ActivationRecorder
    from ckascope.result import CKAResult
    from ckascope.split import SplitCandidate, suggest_split
    from ckascope.views import ViewOptions
