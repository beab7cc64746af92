"""msun: the Multi-scale Unified Network (arXiv 2403.18294) on torchvision backbones.

The public names load on first use (PEP 562), like ckascope's.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckascope.platform import register

__version__ = "0.1.0"

# The entry points in pyproject.toml need an installed package; registering here also covers a
# source tree on PYTHONPATH, once msun is imported (both only name the functions).
register("model_builders", "msun", "msun.checkpoint:model_from_config")
register("model_builders", "msun-scale-bn", "msun.checkpoint:scale_bn_from_config")
register("split_vocabularies", "msun", "msun.splits:split_vocabulary")

_EXPORTS = {
    "MSUN": "msun.model",
    "PrivateBatchNorm2d": "msun.privatebn",
    "ScaleBNNet": "msun.privatebn",
    "build_scale_bn_net": "msun.privatebn",
    "build_msun": "msun.model",
    "count_parameters": "msun.flops",
    "default_si_threshold": "msun.losses",
    "flops_report": "msun.flops",
    "load_checkpoint": "msun.checkpoint",
    "load_msun": "msun.checkpoint",
    "model_from_config": "msun.checkpoint",
    "path_flops": "msun.flops",
    "path_macs": "msun.flops",
    "save_checkpoint": "msun.checkpoint",
    "scale_invariance_loss": "msun.losses",
    "split_points": "msun.backbones",
    "supported_archs": "msun.backbones",
    "vanilla_flops": "msun.flops",
}

__all__ = [
    "MSUN",
    "PrivateBatchNorm2d",
    "ScaleBNNet",
    "__version__",
    "build_msun",
    "build_scale_bn_net",
    "count_parameters",
    "default_si_threshold",
    "flops_report",
    "load_checkpoint",
    "load_msun",
    "model_from_config",
    "path_flops",
    "path_macs",
    "save_checkpoint",
    "scale_invariance_loss",
    "split_points",
    "supported_archs",
    "vanilla_flops",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'msun' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from msun.backbones import split_points, supported_archs
    from msun.checkpoint import load_checkpoint, load_msun, model_from_config, save_checkpoint
    from msun.flops import count_parameters, flops_report, path_flops, path_macs, vanilla_flops
    from msun.losses import default_si_threshold, scale_invariance_loss
    from msun.model import MSUN, build_msun
    from msun.privatebn import PrivateBatchNorm2d, ScaleBNNet, build_scale_bn_net
