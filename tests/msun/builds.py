"""MSUNs built on the meta device, structure only: the published four, shared by the structure
tests of msun.backbones (test_backbones.py), msun.model (test_model.py) and msun.flops."""

from __future__ import annotations

import torch

import msun
from msun.model import MSUN

#: The architectures of the paper's table.
PUBLISHED = ("resnet50", "densenet121", "vgg16_bn", "mobilenet_v2")


def meta_msun(arch: str, **kwargs: object) -> MSUN:
    # Structure only: parameter counts and shapes do not depend on the device.
    with torch.device("meta"):
        return msun.build_msun(arch, **kwargs)  # type: ignore[arg-type]
