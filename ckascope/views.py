"""How a model sees images at another scale: the one resize, and the view built on it.

The ground floor shared by ckascope's comparison and the model families built on ckascope (their
training, evaluation and FLOPs counts): it needs only torch, so they resize images the way a
comparison does without importing the comparison (its recorder, its metric, its progress
display).

Protocols (``vocab.PROTOCOLS``):

- ``upsample``: resize to the scale and back to the model's input size, so a fixed-size model
  sees every scale at its input size (the paper's CKA study; for a multi-path model, each path
  gets the image at its own nominal size);
- ``native``: feed the image at the scale itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ckascope.errors import InputError
from ckascope.vocab import MAX_SCALE, PROTOCOLS, RESIZE_MODES, Protocol


def check_scale(size: int) -> None:
    """Raises InputError unless 1 <= size <= MAX_SCALE."""
    if not isinstance(size, int) or not 1 <= size <= MAX_SCALE:
        raise InputError(f"scales must be integers in 1..{MAX_SCALE} px, got {size!r}")


def resize(images: Tensor, size: int, mode: str = "bilinear", antialias: bool = False) -> Tensor:
    """Resizes a batch (n, C, H, W) to (n, C, size, size) (identity when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(
        images, size=(size, size), mode=mode, align_corners=align, antialias=antialias
    )


@dataclass(frozen=True)
class ScaleView:
    """How a side sees the base images: resized to ``size``, then (``upsample``) back up.

    Attributes:
        size: The scale s in pixels.
        protocol: "upsample" (resize to s and back to ``image_size``: a fixed-size model sees
            every scale at its input size, as in the paper) or "native" (fed at s).
        image_size: The model's input size, the side of the base images.
        mode: Interpolation mode of ``F.interpolate``.
        antialias: Antialiasing when downscaling (the paper's code uses none).
    """

    size: int
    protocol: Protocol = "upsample"
    image_size: int = 224
    mode: str = "bilinear"
    antialias: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        """(n, C, H, W) base images -> the batch this side's model sees."""
        small = resize(images, self.size, self.mode, self.antialias)
        if self.protocol == "native":
            return small
        return resize(small, self.image_size, self.mode, self.antialias)


def check_protocol(protocol: str) -> None:
    """Raises InputError for a protocol other than upsample and native."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}. Hint: use upsample or native")


def check_view_options(protocol: str, mode: str, antialias: bool) -> None:
    """Raises InputError for an unknown protocol or resize mode, or antialias it cannot do."""
    check_protocol(protocol)
    if mode not in RESIZE_MODES:
        raise InputError(
            f"unknown resize mode {mode!r}. Hint: use one of {', '.join(RESIZE_MODES)}"
        )
    if antialias and mode not in ("bilinear", "bicubic"):
        raise InputError(
            f"--antialias works with bilinear and bicubic resizing, not {mode}. Hint: drop --antialias"
        )


def down_and_up(images: Tensor, size: int, image_size: int) -> Tensor:
    """The ``upsample`` view with the defaults: bilinear to ``size`` and back, no antialias."""
    return ScaleView(size, "upsample", image_size)(images)
