"""How the forward passes of a comparison run: memory format and precision.

A comparison's time is its forward passes (the CKA engine adds about 5 % to them), so the
layout and precision of those passes are where it gets faster. Two choices, both undone when the
comparison ends:

- **Memory format.** oneDNN's convolutions on a CPU run faster on channels_last (NHWC) feature
  maps. Measured on the development machine (2-core AMD EPYC, AVX-512, torch 2.14, batch 64,
  eval, ``benchmarks/bench_memory_format.py``): at 224 px resnet18 1.38x, resnet50 1.51x,
  densenet121 1.40x, vgg11_bn 1.38x, mobilenet_v2 1.87x, efficientnet_b0 1.49x, convnext_tiny
  1.05x; at 32 px 0.97-4.0x (resnet18 0.97x, convnext 0.97x, the rest faster), with logits
  within 5e-5 of the contiguous ones (float32 sums in another order). ``auto`` therefore picks
  channels_last on a CPU for any model with a 2-D convolution. On CUDA, NVIDIA's guide puts
  Tensor Core convolutions in NHWC ("Convolutional Layers User's Guide", Tensor Core
  requirements: NHWC avoids the transposes cuDNN otherwise inserts), which matters for reduced
  precision; for IEEE float32 (ckascope's exact default) there is no such rule and no GPU
  measurement here, so ``auto`` stays contiguous on CUDA unless the precision is bf16/fp16.
- **Precision.** ``bf16``/``fp16`` autocast the forward passes only; the hooks build the Grams
  in float32 or float64 with autocast off (``kernels.exact_products``), so only the features
  carry the reduced precision. Opt-in: the CKA moves (see benchmarks/README.md for how much).

The user's model is left as it was: each 4-D parameter and buffer gets a channels_last copy for
the comparison, and its original tensor (same storage, same strides) back afterwards, also when
the comparison raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from ckascope.errors import InputError
from ckascope.vocab import MEMORY_FORMATS, PRECISIONS, MemoryFormat, Precision

Layout = Literal["contiguous", "channels_last"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_execution(memory_format: str, precision: str) -> None:
    """Raises InputError for a memory format or precision no comparison has."""
    if memory_format not in MEMORY_FORMATS:
        raise InputError(
            f"--memory-format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}"
        )
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def has_conv2d(model: nn.Module) -> bool:
    """Whether any module of the model is a 2-D convolution (the layer channels_last speeds up)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def choose_layout(
    requested: MemoryFormat, models: Iterable[nn.Module], device: torch.device, precision: Precision
) -> Layout:
    """The layout the forward passes use: ``requested``, or the measured rule for ``auto``.

    Args:
        requested: auto, contiguous or channels_last.
        models: The compared models (one or two).
        device: Where they run.
        precision: The forward passes' precision.
    """
    if requested != "auto":
        return requested
    if not any(has_conv2d(m) for m in models):
        return "contiguous"  # nothing NHWC helps; a 4-D input would only be copied
    if device.type == "cpu" or (device.type == "cuda" and precision != "float32"):
        return "channels_last"
    return "contiguous"


def to_layout(images: Tensor, layout: Layout) -> Tensor:
    """Images (n, C, H, W) in the layout (a copy only when they are not in it already)."""
    if layout == "channels_last" and images.ndim == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


@contextmanager
def in_layout(models: Iterable[nn.Module], layout: Layout) -> Iterator[None]:
    """Inside the block every 4-D parameter and buffer of the models is channels_last.

    Each tensor's ``.data`` is swapped for a channels_last copy and the original put back on
    exit (also when the block raises): the model ends with the very tensors it had, so its
    layout, values and anything holding them (an optimizer, a user's reference) are untouched.
    Parameter objects, hooks and flags are never replaced.
    """
    originals: list[tuple[Tensor, Tensor]] = []
    try:
        if layout == "channels_last":
            for tensor in _four_d(models):
                originals.append((tensor, tensor.data))
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for tensor, data in originals:
            tensor.data = data


def _four_d(models: Iterable[nn.Module]) -> list[Tensor]:
    """The distinct floating 4-D parameters and buffers of the models (shared ones once)."""
    seen: dict[int, Tensor] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.ndim == 4 and tensor.is_floating_point():
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def autocast_for(device: torch.device, precision: Precision) -> AbstractContextManager[None]:
    """Autocast to the precision's dtype on the device, or nothing for float32.

    Raises:
        InputError: The device has no autocast for that dtype (e.g. fp16 on an old CPU build).
    """
    if precision == "float32":
        return nullcontext()
    dtype = AUTOCAST_DTYPES[precision]
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise InputError(f"--precision {precision}: {device.type} has no autocast")
    return torch.autocast(device.type, dtype=dtype)
