"""ckascope: layer-by-layer CKA of CNNs across input scales and across models."""

from ckascope.cka import cka, cka_matrix
from ckascope.errors import CKAScopeError, InputError, NumericalError, WeightsUnavailableError
from ckascope.layers import list_presets, resolve_layers
from ckascope.metric import MinibatchCKA
from ckascope.recorder import ActivationRecorder

__version__ = "0.1.0"

__all__ = [
    "ActivationRecorder",
    "CKAScopeError",
    "InputError",
    "MinibatchCKA",
    "NumericalError",
    "WeightsUnavailableError",
    "__version__",
    "cka",
    "cka_matrix",
    "list_presets",
    "resolve_layers",
]
