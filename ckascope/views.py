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

import numbers
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ckascope.errors import InputError
from ckascope.options import ViewFields, check_ranges
from ckascope.vocab import MAX_SCALE, PROTOCOLS, RESIZE_MODES, Protocol


def check_scale(size: int) -> int:
    """``size`` as a Python int (a NumPy integer too); InputError unless 1 <= size <= MAX_SCALE."""
    if (
        isinstance(size, bool)
        or not isinstance(size, numbers.Integral)
        or not 1 <= size <= MAX_SCALE
    ):
        raise InputError(
            f"scales must be integers in 1..{MAX_SCALE} px, got {size!r}. Hint: e.g. (32, 224)"
        )
    return int(size)


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
        image_size: The side of the base images, which ``upsample`` resizes back to.
        resize_mode: Interpolation mode of ``F.interpolate``.
        antialias: Antialiasing when downscaling (the paper's code uses none).
    """

    size: int
    protocol: Protocol = "upsample"
    image_size: int = 224
    resize_mode: str = "bilinear"
    antialias: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        """(n, C, H, W) base images -> the batch this side's model sees."""
        small = resize(images, self.size, self.resize_mode, self.antialias)
        if self.protocol == "native":
            return small
        return resize(small, self.image_size, self.resize_mode, self.antialias)


@dataclass(frozen=True)
class ViewOptions(ViewFields):
    """How the base images are prepared, and how every side resizes them to its scale.

    The fields are declared in ``ckascope.options.ViewFields`` (``ckascope compare`` takes them
    too).

    Attributes:
        protocol: "upsample" or "native" (see ``ScaleView``).
        image_size: Side of the base images (the centre crop; under ``upsample`` the model's
            input size); None: the native side of a small-image set, else 224
            (``ckascope.compare`` resolves it from the data).
        resize_size: Short side before the centre crop [image_size * 256 / 224; the image
            size itself, no crop, for sets of small whole images].
        resize_mode: Interpolation for the scales (``RESIZE_MODES``).
        antialias: Antialias when downscaling.
    """

    def __post_init__(self) -> None:
        self.check()  # at construction: the error names the field, before any work

    def check(self) -> None:
        """Raises InputError for a value no view can use, naming the field.

        An unknown protocol or resize mode, antialias it cannot do, or an image or resize size
        outside the range ``ckascope compare`` takes (MIN_IMAGE_SIZE..MAX_SCALE).
        """
        check_view_options(self.protocol, self.resize_mode, self.antialias)
        check_ranges(self, ViewFields)

    def at(self, scale: int) -> ScaleView:
        """The view of a side at ``scale`` (``image_size`` must be resolved)."""
        if self.image_size is None:
            raise ValueError("resolve image_size before making a view")
        return ScaleView(scale, self.protocol, self.image_size, self.resize_mode, self.antialias)


def check_protocol(protocol: str) -> None:
    """Raises InputError for a protocol other than upsample and native."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}. Hint: use upsample or native")


def check_view_options(protocol: str, resize_mode: str, antialias: bool) -> None:
    """Raises InputError for an unknown protocol or resize mode, or antialias it cannot do."""
    check_protocol(protocol)
    if resize_mode not in RESIZE_MODES:
        raise InputError(
            f"unknown resize mode {resize_mode!r}. Hint: use one of {', '.join(RESIZE_MODES)}"
        )
    if antialias and resize_mode not in ("bilinear", "bicubic"):
        raise InputError(
            f"--antialias works with bilinear and bicubic resizing, not {resize_mode}. Hint: drop --antialias"
        )


def down_and_up(images: Tensor, size: int, image_size: int) -> Tensor:
    """The ``upsample`` view with the defaults: bilinear to ``size`` and back, no antialias."""
    return ScaleView(size, "upsample", image_size)(images)
