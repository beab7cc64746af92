"""Every option of ``ckascope compare`` and ``suggest-split``, as one typed dataclass.

The command line is generated from it (``cliutils.config_options``): a field's type, default,
help and range live in one place, here for what is compared and the output, in
``ckascope.options`` for the view and sweep options the library takes too. Plain values only
(no torch), so ``--help`` and usage errors answer without importing torch.

``check_applies`` refuses an option set where the comparison would ignore it (``--scale`` with
one model, ``--ci`` without ``--bootstrap``, ...), before any work. ``resolve`` fills the
defaults that depend on other options (the image size, the scales) and returns a new config:
nothing is set as a side effect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckascope.cliutils import config_field
from ckascope.errors import InputError
from ckascope.options import SWEEP_USES, Applies, SweepFields, ViewFields, refuse_ignored
from ckascope.vocab import MAX_SCALE

#: The size of the base images when neither the weights nor the data say otherwise.
FALLBACK_IMAGE_SIZE = 224


@dataclass(frozen=True)
class Subjects:
    """What a comparison compares: the models, the images, the scales and the layers."""

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
        "4 28 for Fashion-MNIST with --weights none; a checkpoint's smallest and largest "
        "training scales when its training size is used].",
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


# A dataclass orders inherited fields from the last base to the first: the options (and the
# --help) list the subjects, then the view and the sweep options, then the fields below.
@dataclass(frozen=True)
class CompareConfig(SweepFields, ViewFields, Subjects):
    """The options of one comparison; None means "derive it" (see ``resolve``)."""

    device: str = config_field("auto", "auto | cpu | cuda | cuda:N.")
    out: Path | None = config_field(
        None,
        "Output folder [default: ckascope-out/<model>_<a>-<b>, or the first free <...>-2, -3: "
        "a default never replaces a result].",
    )
    overwrite: bool = config_field(
        False,
        "Let --out replace an earlier ckascope result (never a folder of other files).",
        flag=True,
    )
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


def _two_models(cfg: CompareConfig) -> bool:
    return cfg.two_models


#: When the options about the compared models and the output do something (``check_applies``).
COMPARE_USES: dict[str, Applies] = {
    "scale": Applies(
        _two_models,
        "is the one scale two models (--model-b or --checkpoint-b) are compared at; this run "
        "compares one model at two scales and would drop it",
        "use --scales A B (e.g. --scales 16 32), or add --model-b NAME",
    ),
    "scales": Applies(
        lambda cfg: not cfg.two_models,
        "compares two scales of one model; two models (--model-b or --checkpoint-b) are "
        "compared at one scale",
        "use --scale S",
    ),
    "layers_b": Applies(
        _two_models,
        "names the second model's layers, and this run compares one model at two scales",
        "use --layers for its layers, or add --model-b NAME",
    ),
    "weights_b": Applies(
        _two_models,
        "sets the second model's weights, and this run compares one model at two scales",
        "use --weights for its weights, or add --model-b NAME",
    ),
    "num_classes": Applies(
        lambda cfg: cfg.checkpoint is None or (cfg.two_models and cfg.checkpoint_b is None),
        "sets the classes of a model built from its name, and every model here comes from a "
        "checkpoint, whose weights set its classes",
        "drop --num-classes",
    ),
    "overwrite": Applies(
        lambda cfg: cfg.out is not None,
        "lets --out replace an earlier result, and no --out was given (a default folder "
        "never replaces one)",
        "add --out FOLDER, or drop --overwrite",
    ),
    "annotate": Applies(
        lambda cfg: not cfg.no_figures,
        "prints each cell's CKA in the heatmap, and --no-figures draws none",
        "drop --annotate or --no-figures",
    ),
}


def _pretrained_used(weights: str, checkpoint: str) -> Callable[[CompareConfig], bool]:
    """Whether field ``weights`` loads anything: no ``checkpoint`` field set, or "none"."""
    return lambda cfg: getattr(cfg, checkpoint) is None or getattr(cfg, weights) == "none"


#: --weights next to a checkpoint: the checkpoint's weights are loaded, the pretrained ones never
#: ("none", a random start the checkpoint overwrites, changes nothing and is let through).
CHECKPOINT_USES: dict[str, Applies] = {
    name: Applies(
        _pretrained_used(name, ckpt),
        f"loads pretrained weights, and {flag}'s weights are the ones compared",
        f"drop --{name.replace('_', '-')}, or {flag} to compare the pretrained model",
    )
    for name, ckpt, flag in (
        ("weights", "checkpoint", "--checkpoint"),
        ("weights_b", "checkpoint_b", "--checkpoint-b"),
    )
}


#: What else suggest-split's own comparison uses: it saves (with figures) only to ``--out``.
SUGGEST_USES: dict[str, Applies] = {
    name: Applies(
        lambda cfg: cfg.out is not None,
        f"{what}, and suggest-split without --out saves no result and draws no figure",
        f"add --out FOLDER to keep the comparison, or drop {flag}",
    )
    for name, flag, what in (
        ("annotate", "--annotate", "prints each cell's CKA in the heatmap"),
        ("no_figures", "--no-figures", "skips the figures of the saved result"),
    )
}


def check_applies(cfg: CompareConfig, explicit: Collection[str] | None = None) -> None:
    """Refuses an option set where the comparison would ignore it; reads no file, builds nothing.

    E.g. ``--scale`` with one model (compared at two scales), ``--scales`` with two, ``--layers-b``
    or ``--weights-b`` without a second model, ``--ci`` without ``--bootstrap``,
    ``--sigma-frac``/``--bandwidth`` with the linear kernel, ``--overwrite`` without ``--out``,
    ``--annotate`` with ``--no-figures``, ``--weights`` (other than none) with ``--checkpoint``,
    ``--num-classes`` when every model comes from a checkpoint.
    Only options that were set count: a default never triggers it.

    Args:
        cfg: The parsed options (before ``resolve``, which fills in defaults).
        explicit: The names of the options the user gave (``cliutils.explicit_options`` in a
            click command), so that a default typed out (``--weights-b default``) counts too;
            None: the fields whose value differs from their default.

    Raises:
        InputError: The first such option, saying why it does not apply and what to do.
    """
    refuse_ignored(cfg, {**COMPARE_USES, **SWEEP_USES}, explicit)
    refuse_ignored(cfg, CHECKPOINT_USES, explicit)


def check_scales(cfg: CompareConfig) -> None:
    """Refuses one model at one scale: both sides would see the same inputs (a table of 1s).

    Two models at one scale stay valid (``--scale``): their layers differ.

    Args:
        cfg: The resolved options (``resolve``: the scales decided).

    Raises:
        InputError: One model and two equal scales, given or derived (a checkpoint trained at
            one scale).
    """
    if cfg.two_models or cfg.scales is None or cfg.scales[0] != cfg.scales[1]:
        return
    s, size = cfg.scales[0], cfg.image_size or FALLBACK_IMAGE_SIZE
    low, high = sorted((s, size)) if s != size else default_scales(size)
    raise InputError(
        f"both scales are {s} px: one model at one scale is compared with itself, and every "
        f"same-layer CKA is 1. Hint: give two different --scales (e.g. --scales {low} {high}), "
        f"or add --model-b NAME to compare two models at --scale {s}"
    )


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
