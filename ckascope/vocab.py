"""The vocabulary of options shared by the library and the command lines.

Plain values only (no torch): the command line builds its options from them, so ``--help`` and
usage errors answer without importing torch.
"""

from __future__ import annotations

from typing import Literal

#: Kernels of the CKA engine.
Kernel = Literal["linear", "rbf"]
KERNELS: tuple[Kernel, ...] = ("linear", "rbf")
#: RBF bandwidth per batch, or fixed from the first batch.
Bandwidth = Literal["batch", "first"]
#: How batches are averaged: each once, or by their example count.
Weighting = Literal["batch", "examples"]
#: Precision of the Gram products ("auto": float64 for small layers).
GramDtype = Literal["auto", "float32", "float64"]

#: How the small-scale input reaches the model: back up to the image size, or at its own size.
Protocol = Literal["upsample", "native"]
PROTOCOLS: tuple[Protocol, ...] = ("upsample", "native")
RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")
MAX_SCALE = 4096
#: The smallest image size (centre crop) and resize size a view takes.
MIN_IMAGE_SIZE = 4

#: Minimum same-layer cross-scale CKA of the shared trunk's input (``suggest-split``).
DEFAULT_THRESHOLD = 0.8

#: The layout of the forward passes' feature maps ("auto": the rule in ``ckascope.execution``).
MemoryFormat = Literal["auto", "contiguous", "channels_last"]
MEMORY_FORMATS: tuple[MemoryFormat, ...] = ("auto", "contiguous", "channels_last")
#: The forward passes' precision: float32, or autocast to bfloat16 / float16 (Grams stay float32+).
Precision = Literal["float32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bf16", "fp16")
