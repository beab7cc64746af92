"""Split-point candidates with their costs, for ``ckascope suggest-split``.

``split_vocabulary`` is msun's ``ckascope.split_vocabularies`` entry point (pyproject.toml):
ckascope imports it only when it needs a vocabulary, and never names msun.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ckascope.split import SplitCandidate
from msun.backbones import backbone_for, split_points, supported_archs
from msun.flops import flops_report
from msun.model import build_msun


def trunk_module(arch: str, split_at: str) -> str:
    """The torchvision module name where the trunk starts (DenseNet's live under ``features``)."""
    return f"features.{split_at}" if backbone_for(arch).family == "densenet" else split_at


def split_candidates(
    arch: str, scales: Sequence[int] = (32, 128, 224), num_classes: int = 1000
) -> list[SplitCandidate]:
    """Every legal split point of ``arch`` in forward order, with its costs.

    The costs are the parameters the per-scale subnets add and the routed model's mean MACs per
    image over the 13 test sizes (the ``upsample`` protocol), counted on the meta device (shapes only).
    """
    out = []
    for name in split_points(arch):
        with torch.device("meta"):
            model = build_msun(arch, split_at=name, scales=tuple(scales), num_classes=num_classes)
        report = flops_report(model.eval())
        extra = report.parameters.total - report.parameters.vanilla
        out.append(
            SplitCandidate(name, trunk_module(arch, name), extra, report.mean("upsample") / 2)
        )
    return out


def split_vocabulary(arch: str) -> list[SplitCandidate] | None:
    """The ``ckascope.split_vocabularies`` entry: ``split_candidates``, None for other archs."""
    return split_candidates(arch) if arch in supported_archs() else None
