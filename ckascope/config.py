"""Every option of ``ckascope compare`` and ``suggest-split``, as one typed dataclass.

The command line is generated from it (``cliutils.config_options``): a field's type, default,
help and range live in one place. Plain values only (no torch), so ``--help`` and usage errors
answer without importing torch.

``resolve`` fills the defaults that depend on other options (the image size, the scales) and
returns a new config: nothing is set as a side effect.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckascope.cliutils import config_field
from ckascope.vocab import (
    MAX_SCALE,
    RESIZE_MODES,
    Bandwidth,
    GramDtype,
    Kernel,
    MemoryFormat,
    Precision,
    Protocol,
    Weighting,
)

#: The size of the base images when neither the weights nor the data say otherwise.
FALLBACK_IMAGE_SIZE = 224


@dataclass(frozen=True)
class CompareConfig:
    """The options of one comparison; None means "derive it" (see ``resolve``)."""

    model: str | None = config_field(
        None, "torchvision model name (ckascope models lists them).", short="-m"
    )
    weights: str = config_field("default", "none | default | enum name (IMAGENET1K_V2).")
    checkpoint: Path | None = config_field(
        None, "Local checkpoint (state dict for --model, or a self-describing one)."
    )
    model_b: str | None = config_field(
        None, "Second model: compare two models at --scale instead of two scales."
    )
    weights_b: str = config_field("default", "Weights of the second model.")
    checkpoint_b: Path | None = config_field(None, "Checkpoint of the second model.")
    num_classes: int | None = config_field(
        None, "Classes of randomly initialised models (default 1000).", min=2
    )
    data: str | None = config_field(
        None,
        "ImageFolder dir, NAME:PATH (cifar10:~/data, fashionmnist:DIR of idx files), "
        "fashionmnist (Debian's dataset-fashion-mnist; 28 px), or omit for the synthetic set.",
    )
    scales: tuple[int, int] | None = config_field(
        None,
        "Two input scales in px  [default: image size/7 and the image size, e.g. 32 224; "
        "4 28 for Fashion-MNIST with --weights none].",
        min=1,
        max=MAX_SCALE,
    )
    scale: int | None = config_field(
        None,
        "Input scale when comparing two models  [default: the image size].",
        min=1,
        max=MAX_SCALE,
    )
    layers: str = config_field(
        "blocks", "Preset (blocks|stages|leaves), names or patterns, comma-separated."
    )
    layers_b: str | None = config_field(None, "Layers of the second model (default: --layers).")
    kernel: Kernel = config_field("linear", "CKA kernel.")
    sigma_frac: float = config_field(1.0, "RBF bandwidth: sigma² = f² · median D².")
    bandwidth: Bandwidth = config_field(
        "batch", "RBF sigma per batch, or fixed from the first batch."
    )
    weighting: Weighting = config_field("batch", "Weight of a short batch.")
    protocol: Protocol = config_field(
        "upsample",
        "upsample: back to the image size; native: fed at the scale.",
    )
    resize_mode: str = config_field(
        "bilinear", "Interpolation for the scales.", choices=RESIZE_MODES
    )
    antialias: bool = config_field(False, "Antialias when downscaling.")
    image_size: int | None = config_field(
        None,
        "Centre-crop size of the base images (the model's input size under upsample)  "
        "[default: the size pretrained weights expect (299 inception_v3), else the data's "
        "native size (28 for mnist/fashionmnist/kmnist, 32 cifar/svhn, 96 stl10), else 224].",
        min=4,
        max=MAX_SCALE,
    )
    resize_size: int | None = config_field(
        None,
        "Short side before the centre crop  [default: image size x 256/224; the image size "
        "(whole image) for the small-image sets].",
        min=4,
        max=MAX_SCALE,
    )
    batch_size: int = config_field(128, "Images per batch (at least 4: the unbiased HSIC needs 4).")
    num_images: int | None = config_field(
        None, "Random subset size per sweep [default: all; 1280 synthetic].", min=1
    )
    repeats: int = config_field(1, "Sweeps over random permutations (the paper: 10).", min=1)
    seed: int = config_field(0, "Seed of the image subsets and of randomly initialised models.")
    device: str = config_field("auto", "auto | cpu | cuda | cuda:N.")
    workers: int = config_field(0, "DataLoader worker processes.", min=0)
    tf32: bool = config_field(
        False, "Let CUDA convolutions use TF32 (faster on Ampere and later, ~1e-3 off in CKA)."
    )
    gram_dtype: GramDtype = config_field("auto", "Precision of the Grams.")
    memory_format: MemoryFormat = config_field(
        "auto",
        "Layout of the forward passes' feature maps (auto: channels_last for CNNs on a CPU, "
        "measured 1.4-1.9x faster at 224 px; the model is left as it was).",
    )
    precision: Precision = config_field(
        "float32",
        "Forward passes in float32, or autocast to bf16/fp16 (faster, CKA moves: see "
        "benchmarks/README.md; the Grams stay float32/float64).",
    )
    bootstrap: int = config_field(
        0,
        "Bootstrap replicates for a confidence interval on every cell (batches resampled, and "
        "sweeps; no extra forward pass; e.g. 1000) [0: none].",
        min=0,
    )
    ci: float = config_field(0.95, "Coverage of the bootstrap interval.", min=0.5, max=0.999)
    permutations: int = config_field(
        0,
        "Permutation null: CKA with the images shuffled between the sides within each batch, "
        "this many times (e.g. 20); gives the chance level, a z-score and a p-value per cell "
        "[0: none].",
        min=0,
    )
    out: Path | None = config_field(
        None,
        "Output folder [default: ckascope-out/<model>_<a>-<b>, or the first free <...>-2, -3: "
        "a default never replaces a result].",
    )
    overwrite: bool = config_field(False, "Let --out replace what its folder holds.", flag=True)
    no_figures: bool = config_field(False, "Skip the PNG/PDF figures.", flag=True)
    annotate: bool = config_field(False, "Print each cell's CKA in the heatmap.", flag=True)

    @property
    def two_models(self) -> bool:
        """Whether two models are compared (at ``scale``) rather than one at two ``scales``."""
        return bool(self.model_b or self.checkpoint_b)

    @property
    def side_scales(self) -> tuple[int | None, int | None]:
        """The scales of the rows and of the columns: ``scales``, or ``scale`` twice."""
        if self.two_models:
            return self.scale, self.scale
        return self.scales or (None, None)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CompareConfig:
        """The config of parsed command-line options (click passes tuples and None)."""
        return cls(**{k: v for k, v in options.items() if k in FIELDS})


FIELDS = {f.name: f for f in dataclasses.fields(CompareConfig)}


def default_scales(image_size: int) -> tuple[int, int]:
    """The paper's pair (32, 224) scaled to ``image_size``: (image_size/7, image_size)."""
    return max(1, round(image_size / 7)), image_size


def resolve(cfg: CompareConfig, image_size: int) -> CompareConfig:
    """The config with the image size, and the scales derived from it, filled in.

    Args:
        cfg: The parsed options.
        image_size: The image size to use (``commands.resolve_config`` decides it: --image-size,
            else what the weights or the data expect).
    """
    return dataclasses.replace(
        cfg,
        image_size=image_size,
        scales=cfg.scales or default_scales(image_size),
        scale=cfg.scale or image_size,
    )
