"""The options of a comparison that a user sets, each declared once.

``ViewFields`` are the fields of ``ViewOptions`` (``ckascope.views``) and ``SweepFields`` those of
``SweepOptions`` (``ckascope.compare``), which add their checks; ``ckascope compare``'s
``CompareConfig`` (``ckascope.config``) takes both as its own fields, and its command line is
generated from them (``cliutils.config_options``). So a field's name, type, default, help text
and range are written here only. Plain values (no torch), so that ``--help`` and usage errors
answer without importing torch.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ckascope.cliutils import config_field
from ckascope.errors import InputError
from ckascope.vocab import (
    MAX_SCALE,
    MIN_IMAGE_SIZE,
    RESIZE_MODES,
    Bandwidth,
    GramDtype,
    Kernel,
    MemoryFormat,
    Precision,
    Protocol,
    Weighting,
)

#: The coverages ``--ci`` takes: below 0.5 an interval says little, at 1 it is every replicate.
CI_RANGE = (0.5, 0.999)
#: The most bootstrap replicates or permutations a sweep takes. 10 000 give p-values down to
#: 1/10 001 and the ends of a 95 % percentile interval to about 1 % of its width (the Monte
#: Carlo error of a 2.5 % quantile, for a normal spread; Efron & Tibshirani 1993 advise 1000 to
#: 2000 replicates for an interval); each one more is an (La, Lb) float64 matrix held in
#: memory and, for a permutation, one more product of every batch's kernel matrices.
MAX_REPLICATES = 10_000


@dataclass(frozen=True)
class ViewFields:
    """How the base images are prepared and resized to each scale (see ``ViewOptions``)."""

    protocol: Protocol = config_field(
        "upsample",
        "upsample: back to the image size; native: fed at the scale.",
    )
    image_size: int | None = config_field(
        None,
        "Centre-crop size of the base images (the model's input size under upsample)  "
        "[default: the size pretrained weights expect (299 inception_v3), else the size a "
        "lone checkpoint (no --checkpoint-b) was trained at, when it records it, else the data's "
        "native size (28 for mnist/fashionmnist/kmnist, 32 cifar/svhn, 96 stl10), else 224].",
        min=MIN_IMAGE_SIZE,
        max=MAX_SCALE,
    )
    resize_size: int | None = config_field(
        None,
        "Short side before the centre crop  [default: image size x 256/224; the image size "
        "(whole image) for the small-image sets].",
        min=MIN_IMAGE_SIZE,
        max=MAX_SCALE,
    )
    resize_mode: str = config_field(
        "bilinear", "Interpolation for the scales.", choices=RESIZE_MODES
    )
    antialias: bool = config_field(False, "Antialias when downscaling.")


@dataclass(frozen=True)
class SweepFields:
    """The sweep over the images: kernel, batching, calibration, precision (see ``SweepOptions``)."""

    kernel: Kernel = config_field("linear", "CKA kernel.")
    sigma_frac: float = config_field(1.0, "RBF bandwidth (--kernel rbf): sigma² = f² · median D².")
    bandwidth: Bandwidth = config_field(
        "batch", "RBF sigma (--kernel rbf) per batch, or fixed from the first batch."
    )
    weighting: Weighting = config_field("batch", "Weight of a short batch.")
    batch_size: int = config_field(128, "Images per batch (at least 4: the unbiased HSIC needs 4).")
    repeats: int = config_field(1, "Sweeps over random permutations (the paper: 10).", min=1)
    num_images: int | None = config_field(
        None, "Random subset size per sweep [default: all; 1280 synthetic].", min=1
    )
    seed: int = config_field(0, "Seed of the image subsets and of randomly initialised models.")
    num_workers: int = config_field(0, "DataLoader worker processes.", min=0, option="--workers")
    tf32: bool = config_field(
        False, "Let CUDA convolutions use TF32 (faster on Ampere and later, ~1e-3 off in CKA)."
    )
    gram_dtype: GramDtype = config_field("auto", "Precision of the Grams.")
    bootstrap: int = config_field(
        0,
        "Bootstrap replicates for a confidence interval on every cell (batches resampled, and "
        "sweeps; no extra forward pass; e.g. 1000; at most 10000, each one held in memory) "
        "[0: none].",
        min=0,
    )
    ci: float = config_field(
        0.95,
        "Coverage of the bootstrap interval (with --bootstrap).",
        min=CI_RANGE[0],
        max=CI_RANGE[1],
    )
    permutations: int = config_field(
        0,
        "Permutation null: CKA with the images shuffled between the sides within each batch, "
        "this many times (e.g. 20); gives the chance level, a z-score and a p-value per cell "
        "(at most 10000: p-values down to 1/10001; each one held in memory) [0: none].",
        min=0,
    )
    memory_format: MemoryFormat = config_field(
        "auto",
        "Layout of the forward passes' feature maps (auto: channels_last for CNNs on a CPU, "
        "measured 1.05-1.87x faster at 224 px over seven torchvision families, see "
        "docs/performance.md; the model is left as it was).",
    )
    precision: Precision = config_field(
        "float32",
        "Forward passes in float32, or autocast to bf16/fp16 (faster, CKA moves: see "
        "benchmarks/README.md; the Grams stay float32/float64).",
    )


@dataclass(frozen=True)
class Applies:
    """When an option does something, and what to say when it is set where it does nothing.

    Attributes:
        when: Whether the option is used, given all the options (a config or SweepOptions).
        why: What it does and why this run would ignore it (the message goes on after its flag).
        hint: What to do instead.
    """

    when: Callable[[Any], bool]
    why: str
    hint: str


def _rbf(options: Any) -> bool:
    return bool(options.kernel == "rbf")


#: When the sweep options that serve only another option do something (``refuse_ignored``).
SWEEP_USES: dict[str, Applies] = {
    "sigma_frac": Applies(
        _rbf,
        "sets the RBF kernel's bandwidth, and the kernel is linear (it has none)",
        "add --kernel rbf, or drop --sigma-frac",
    ),
    "bandwidth": Applies(
        _rbf,
        "chooses how the RBF kernel's bandwidth is set, and the kernel is linear (it has none)",
        "add --kernel rbf, or drop --bandwidth",
    ),
    "ci": Applies(
        lambda o: o.bootstrap > 0,
        "sets the coverage of the bootstrap interval, and --bootstrap is 0 (no interval)",
        "add --bootstrap N (e.g. 1000), or drop --ci",
    ),
}


def refuse_ignored(
    options: object, uses: Mapping[str, Applies], explicit: Collection[str] | None = None
) -> None:
    """Raises InputError for an option that was set where the run would ignore it.

    Only options that were set count, so a default never triggers it.

    Args:
        options: A dataclass of options (a ``CompareConfig``, a ``SweepOptions``).
        uses: When each option does something, by field name.
        explicit: The names of the options the user set (the command line knows them: click's
            parameter source, ``cliutils.explicit_options``), so that a default typed out
            (``--ci 0.95``) counts too. None: the fields whose value differs from their
            default, all that a dataclass can tell.
    """
    given = changed_fields(options) if explicit is None else explicit
    for name, rule in uses.items():
        if name in given and not rule.when(options):
            raise InputError(f"{flag_of(options, name)} {rule.why}. Hint: {rule.hint}")


def changed_fields(options: object) -> set[str]:
    """The names of the fields of dataclass ``options`` whose value is not their default."""
    return {
        f.name
        for f in dataclasses.fields(options)  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING and getattr(options, f.name) != f.default
    }


def flag_of(options: object, name: str) -> str:
    """The command-line flag of field ``name`` (``--sigma-frac``; a field's own ``option``)."""
    field = next(f for f in dataclasses.fields(options) if f.name == name)  # type: ignore[arg-type]
    return str(field.metadata.get("option", "--" + name.replace("_", "-")))


def values_of(config: object, group: type) -> dict[str, Any]:
    """The values ``config`` holds for the fields of dataclass ``group``, by name.

    E.g. ``values_of(cfg, SweepFields)``: a ``CompareConfig``'s sweep options.
    """
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(group)}


def literal_choices(config: type) -> dict[str, tuple[str, ...]]:
    """The allowed values of every field of dataclass ``config`` typed by a ``Literal``."""
    hints = typing.get_type_hints(config)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(config)
        if typing.get_origin(hints[f.name]) is typing.Literal
    }


def check_ranges(options: object, group: type) -> None:
    """Raises InputError for a field of ``group`` outside the range its command-line option takes.

    The library keeps the command line's ranges (``config_field``'s ``min``/``max``), so a value
    ``ckascope compare`` refuses is refused at construction of ``ViewOptions``/``SweepOptions``
    too. A field whose default is None may be None (derived later). A NumPy number is stored
    as the Python number it equals (``_plain_numbers``).

    Args:
        options: A dataclass holding the fields of ``group`` (e.g. a ``ViewOptions``).
        group: The dataclass that declares them (``ViewFields`` or ``SweepFields``).
    """
    _plain_numbers(options, group)
    for f in dataclasses.fields(group):
        low, high = f.metadata.get("min"), f.metadata.get("max")
        value = getattr(options, f.name)
        if (low is None and high is None) or (value is None and f.default is None):
            continue
        integral = not isinstance(low, float) and not isinstance(high, float)
        if not _within(value, low, high, integral):
            flag = flag_of(options, f.name)
            raise InputError(
                f"{type(options).__name__}.{f.name} must be {_span(low, high, integral)}, got "
                f"{value!r}. Hint: the command line's {flag} takes the same values"
                + ("; None gives the default" if f.default is None else "")
            )


def _plain_numbers(options: object, group: type) -> None:
    """Stores each NumPy number among the fields of ``group`` as the Python number it equals.

    The settings are written to JSON and seeds go to torch, neither of which takes NumPy's.
    """
    for f in dataclasses.fields(group):
        value = getattr(options, f.name)
        if isinstance(value, bool | int | float) or not isinstance(value, numbers.Real):
            continue  # already plain, or not a number at all (a check below names it)
        plain = int(value) if isinstance(value, numbers.Integral) else float(value)
        object.__setattr__(options, f.name, plain)  # frozen dataclasses: the way to store it


def _within(value: Any, low: float | None, high: float | None, integral: bool) -> bool:
    """Whether ``value`` is a number of the field's kind in [low, high] (NaN never is)."""
    kinds = (int,) if integral else (int, float)  # NumPy's made plain (``_plain_numbers``)
    if isinstance(value, bool) or not isinstance(value, kinds):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _span(low: float | None, high: float | None, integral: bool) -> str:
    """How a range reads in a message: "an integer in 4..4096", "an integer >= 1"."""
    kind = "an integer" if integral else "a number"
    if low is not None and high is not None:
        return f"{kind} in {low}..{high}"
    return f"{kind} >= {low}" if low is not None else f"{kind} <= {high}"
