"""The training augmentation, batched, for image sets held in memory as one uint8 array.

The per-image pipeline (``msun.data.train_transform``: RandomResizedCrop, bicubic with
antialiasing, then a horizontal flip, through torchvision's v2 transforms) costs about 0.6 ms
per 28-px image in Python: 37 ms of a 64-image batch, a third of a ResNet-18 step at 28 px on
two CPU cores. For sets whose images are all in memory at one size (the MNIST family, CIFAR),
this module applies the same augmentation to a whole batch at once:

- The parameters are drawn exactly as torchvision's transforms draw them, in the same order,
  from a generator seeded with the item's own seed (``draw_crop``): every image gets the crop
  and flip the per-image pipeline would give it.
- A crop then resize is linear and separable: ``out = A @ image @ B.T`` with A (size, H) the
  rows' resampling weights placed at the crop's rows, B (size, W) the columns', its rows
  reversed for a flip. The weights are torch's own antialiased bicubic weights, read off by
  resizing an identity matrix (``resize_matrix``), so nothing of the kernel is re-derived here.
  Two batched float64 products (columns, then rows, each rounded to uint8 as torch's uint8
  kernel rounds its two passes) give every image. torch's kernel uses fixed-point weights, so
  under 1 % of the pixels differ from it, by at most two levels (tests/msun/test_augment.py).

No library offers this: torchvision's v2 transforms take one set of parameters per call, and
its batched crops (``roi_align``) are bilinear and unquantised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ckascope.platform import IMAGENET_MEAN, IMAGENET_STD, Batch

#: RandomResizedCrop's default aspect-ratio range (the recipe's).
RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Crop:
    """One image's augmentation: the crop box in pixels and whether it is mirrored."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_crop(
    seed: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Crop:
    """The crop and flip torchvision's v2 RandomResizedCrop + RandomHorizontalFlip draw.

    The same draws in the same order (``RandomResizedCrop.make_params``, then the flip's
    ``torch.rand(1) < p``) from a CPU generator seeded with ``seed``: what the per-image
    pipeline draws after ``torch.manual_seed(seed)``.
    """
    g = torch.Generator().manual_seed(seed)
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=g)
        ).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:
        top, left, h, w = _central_crop(height, width, ratio)
    return Crop(top, left, h, w, bool(torch.rand(1, generator=g).item() < 0.5))


def _central_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback after ten rejected draws: the widest central crop in range."""
    in_ratio = width / height
    h, w = height, width
    if in_ratio < min(ratio):
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        w = round(h * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


@lru_cache(maxsize=512)
def resize_matrix(src: int, dst: int) -> Tensor:
    """(dst, src) float64 weights of torch's antialiased bicubic resize of one axis.

    Resizing the identity along one axis returns the weights themselves (the other axis keeps
    its size, which antialiased bicubic leaves unchanged).
    """
    eye = torch.eye(src, dtype=torch.float64)[None, None]  # (1, 1, src, src)
    weights = F.interpolate(
        eye, size=(dst, src), mode="bicubic", align_corners=False, antialias=True
    )
    return weights[0, 0]  # (dst, src)


def crop_matrices(crops: list[Crop], size: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Row and column resampling matrices of a batch: A (n, size, H), B (n, size, W), float64."""
    rows = torch.zeros(len(crops), size, height, dtype=torch.float64)
    cols = torch.zeros(len(crops), size, width, dtype=torch.float64)
    for i, c in enumerate(crops):
        rows[i, :, c.top : c.top + c.height] = resize_matrix(c.height, size)
        col = resize_matrix(c.width, size)
        cols[i, :, c.left : c.left + c.width] = col.flip(0) if c.flip else col
    return rows, cols


def apply_crops(images: Tensor, crops: list[Crop], size: int) -> Tensor:
    """Crops, resizes and flips a batch as the per-image pipeline does, then normalises.

    Args:
        images: (n, C, H, W) uint8, C = 1 (repeated to RGB) or 3.
        crops: One ``Crop`` per image.
        size: Output side in pixels.

    Returns:
        (n, 3, size, size) float32, ImageNet-normalised.
    """
    rows, cols = crop_matrices(crops, size, images.shape[-2], images.shape[-1])
    # Columns first, each pass rounded to uint8: what torch's uint8 kernel does (a bicubic
    # overshoot is clipped between the passes, up to 16 levels apart from one float pass).
    wide = _uint8(images.to(torch.float64) @ cols[:, None].transpose(-1, -2))  # (n, C, H, size)
    out = _uint8(rows[:, None] @ wide).to(torch.float32) / 255  # (n, C, size, size), ToDtype
    out = out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def _uint8(x: Tensor) -> Tensor:
    return x.round().clamp(0, 255)


def in_memory_images(dataset: Dataset[Any]) -> tuple[Tensor, Tensor] | None:
    """A set's images (N, C, H, W) uint8 and labels (N,) int64, when it holds them in one array.

    The MNIST family keeps ``data`` as an (N, H, W) uint8 tensor, CIFAR as an (N, H, W, 3) uint8
    array, each with ``targets``; a ``Subset`` of either is taken through its indices. Other
    sets (folders of files, drawn on the fly) give None and keep the per-image pipeline.
    """
    if isinstance(dataset, Subset):
        inner = in_memory_images(dataset.dataset)
        if inner is None:
            return None
        keep = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return inner[0][keep], inner[1][keep]
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if targets is None or not isinstance(data, (Tensor, np.ndarray)) or data.dtype.itemsize != 1:
        return None
    images = torch.as_tensor(data)
    if images.dtype != torch.uint8 or images.ndim not in (3, 4):
        return None
    if images.ndim == 3:
        images = images[:, None]  # (N, 1, H, W)
    elif images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)  # (N, 3, H, W)
    else:
        return None
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return (images.contiguous(), labels) if len(labels) == len(images) else None


class BatchAugmented(Dataset[Any]):
    """Training images held in memory, augmented a batch at a time.

    Keys are ``(index, seed)`` pairs, as for ``msun.data.SeededItems``; ``__getitems__`` (which
    the DataLoader calls with a whole batch of keys) returns the collated ``Batch``.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        size: Output side of the crops.
        crop_scale_min: Smallest crop area fraction.
        classes: Class names, as the dataset named them.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        size: int,
        crop_scale_min: float,
        classes: list[str] | None = None,
    ) -> None:
        self.images, self.labels, self.size = images, labels, size
        self.scale = (crop_scale_min, 1.0)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Batch:
        index = torch.tensor([i for i, _ in keys], dtype=torch.long)
        height, width = self.images.shape[-2:]
        crops = [draw_crop(seed, height, width, self.scale, RATIO) for _, seed in keys]
        images = apply_crops(self.images[index], crops, self.size)
        return Batch(images, self.labels[index], [])

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        batch = self.__getitems__([key])
        return batch.images[0], int(batch.labels[0])
