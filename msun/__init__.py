"""msun: the Multi-scale Unified Network (arXiv 2403.18294) on torchvision backbones."""

__version__ = "0.1.0"
