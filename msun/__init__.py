"""msun: the Multi-scale Unified Network (arXiv 2403.18294) on torchvision backbones."""

from msun.backbones import split_points, supported_archs
from msun.checkpoint import load_checkpoint, model_from_config, save_checkpoint
from msun.flops import count_parameters, flops_report, path_flops, path_macs, vanilla_flops
from msun.losses import default_si_threshold, scale_invariance_loss
from msun.model import MSUN, build_msun

__version__ = "0.1.0"

__all__ = [
    "MSUN",
    "__version__",
    "build_msun",
    "count_parameters",
    "default_si_threshold",
    "flops_report",
    "load_checkpoint",
    "model_from_config",
    "path_flops",
    "path_macs",
    "save_checkpoint",
    "scale_invariance_loss",
    "split_points",
    "supported_archs",
    "vanilla_flops",
]
