"""Training objectives: one module whose forward computes the whole loss, so DDP can wrap it.

- vanilla: cross-entropy of the network on the crop;
- mst (multi-scale training): the crop resized to every scale and back up to the image size,
  one cross-entropy per scale, summed;
- msun: every path on the crop resized to its nominal size, one cross-entropy per path plus the
  scale-invariance loss on the unified subnet outputs;
- routed (fine-tuning from ``--init-from``): an MSUN routes the images by their own size; a plain
  network sees them resized to the size it was trained at.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ckascope.views import down_and_up, resize
from msun.config import TrainConfig
from msun.losses import scale_invariance_loss
from msun.model import MSUN

Terms = dict[str, Tensor]


class Objective(nn.Module):
    """``forward(images, labels) -> (loss, detached terms to log)``.

    Args:
        model: The network.
        cfg: The resolved training config.
        routed: Fine-tuning mode (see the module docstring).
        image_size: The image size a plain network was trained at (routed mode).
    """

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, *, routed: bool = False, image_size: int = 224
    ) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.mode = "routed" if routed else cfg.method
        self.image_size = image_size

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Terms]:
        """Loss of one micro-batch (n, 3, H, W) with labels (n,)."""
        if self.mode == "msun":
            return self._msun(images, labels)
        if self.mode == "mst":
            logits = [
                self.model(down_and_up(images, s, self.cfg.image_size)) for s in self.cfg.scales
            ]
            return _summed(
                {
                    f"ce_{s}": F.cross_entropy(lg, labels)
                    for s, lg in zip(self.cfg.scales, logits, strict=True)
                }
            )
        if self.mode == "routed" and not isinstance(self.model, MSUN):
            images = resize(images, self.image_size)
        return _summed({"ce": F.cross_entropy(self.model(images), labels)})

    def _msun(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Terms]:
        zs, logits = self.model.forward_all(images)  # type: ignore[operator]
        terms = {
            f"ce_{s}": F.cross_entropy(lg, labels)
            for s, lg in zip(self.cfg.scales, logits, strict=True)
        }
        threshold = 0.0 if self.cfg.si_threshold is None else self.cfg.si_threshold
        pairs: Literal["all", "largest"] = "largest" if self.cfg.si_pairs == "largest" else "all"
        terms["si"] = scale_invariance_loss(
            zs, weight=self.cfg.si_weight, threshold=threshold, pairs=pairs
        )
        return _summed(terms)


def _summed(terms: Terms) -> tuple[Tensor, Terms]:
    return torch.stack(list(terms.values())).sum(), {k: v.detach() for k, v in terms.items()}
