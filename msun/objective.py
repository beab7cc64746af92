"""Training objectives: one module whose forward computes the whole loss, so DDP can wrap it.

- vanilla: cross-entropy of the network on the crop;
- mst (multi-scale training): the crop resized to every scale and back up to the image size,
  one cross-entropy per scale, summed; with private BatchNorm (``--bn private``) scale k runs
  with BatchNorm set k, and ``--distill`` adds RS-Nets' ensemble distillation
  (:func:`ensemble_distillation`);
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

from ckascope.platform import down_and_up, is_multipath, resize
from msun.config import TrainConfig
from msun.losses import scale_invariance_loss
from msun.privatebn import ScaleBNNet

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
            return self._mst(images, labels)
        if self.mode == "routed" and not is_multipath(self.model):
            images = resize(images, self.image_size)
        return _summed({"ce": F.cross_entropy(self.model(images), labels)})

    def _mst(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Terms]:
        logits = [self._at_scale(images, k, s) for k, s in enumerate(self.cfg.scales)]
        terms = {
            f"ce_{s}": F.cross_entropy(lg, labels)
            for s, lg in zip(self.cfg.scales, logits, strict=True)
        }
        if self.cfg.distill:
            kd = ensemble_distillation(logits)
            terms.update({f"kd_{s}": t for s, t in zip(self.cfg.scales, kd, strict=True)})
        return _summed(terms)

    def _at_scale(self, images: Tensor, k: int, scale: int) -> Tensor:
        """Logits of the crop brought to ``scale`` and back (BatchNorm set k when private)."""
        x = down_and_up(images, scale, self.cfg.image_size)
        if isinstance(self.model, ScaleBNNet):
            return self.model.forward_path(x, k, protocol="native")  # x is at image_size already
        logits: Tensor = self.model(x)
        return logits

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


def ensemble_distillation(logits: list[Tensor]) -> list[Tensor]:
    """RS-Nets' ensemble distillation: KL(softmax(mean) || softmax(z_s)) for every scale s.

    The teacher is the mean of all scales' logits, detached, so each scale learns from the
    ensemble and the ensemble is not pulled towards any one scale (Wang et al., ECCV 2020,
    section 3.2; their code's ``kd_type="ens"`` with fixed, equal ensemble weights). KL is
    averaged over the batch (``batchmean``, the mathematical KL per image), in float32.

    Args:
        logits: Per scale, (B, num_classes).

    Returns:
        Per scale, a scalar tensor.
    """
    teacher = torch.stack([lg.detach().float() for lg in logits]).mean(0)  # (B, classes)
    target = F.softmax(teacher, dim=1)
    return [
        F.kl_div(F.log_softmax(lg.float(), dim=1), target, reduction="batchmean") for lg in logits
    ]


def _summed(terms: Terms) -> tuple[Tensor, Terms]:
    return torch.stack(list(terms.values())).sum(), {k: v.detach() for k, v in terms.items()}
