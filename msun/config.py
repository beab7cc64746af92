"""Training configuration: the published recipe as defaults, YAML files, flags that win.

The recipe (docs/msun.md): SGD momentum 0.9, weight decay 2e-5 on all parameters, RandomResizedCrop
224 (scale 0.08-1, bicubic) + horizontal flip, 5 warm-up epochs (5/90 of a shorter run) from
0.01·lr then cosine to
0.01·lr, mixed precision, gradient clipping 1.0 for MSUN only (the authors' vanilla and MST
trainers do not clip), 90 epochs (MobileNetV2 300). The learning rate
scales linearly with the global batch: 0.5 per 1024 images for the ResNet family (ResNet-50's
published setting), 0.1 per 256 for the other backbones. The values that differ between
architectures (epochs, learning rate, τ, split point) are each one's record in ``msun.recipes``.

``resolve`` turns every "derive it" default (None) into the value actually used; the resolved
config is written to the run folder and into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import reprlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ckascope.platform import MAX_SCALE, MIN_IMAGE_SIZE, InputError, config_field, hint_close

METHODS = ("msun", "mst", "vanilla")
BN_MODES = ("shared", "private")
AMP_MODES = ("auto", "bf16", "fp16", "none")
#: Keys that ``--resume`` may change, none of them the recipe or what a logged number means:
#: ``workers`` (loading speed: every batch is planned and seeded by index), ``tensorboard`` and
#: ``save_every`` (what is written besides, and how often), ``device`` and ``out`` (where it
#: runs and writes; the precision, ``amp``, is compared), ``eval_every`` (which epochs are
#: validated: every score keeps its meaning under the same validation options), ``cka_from``
#: (only feeds the first start's ``--split-at auto``: a resumed run keeps its split).
RESUMABLE_CHANGES = frozenset(
    {"workers", "tensorboard", "save_every", "eval_every", "device", "out", "cka_from"}
)
#: What validation measures. They change no weight, but a run's validation means are
#: comparable (and its best.pt chosen among them) only under one setting: ``--resume`` refuses
#: another, while a finished run may be reused whatever they are (nothing is validated again).
VALIDATION_OPTIONS = frozenset({"num_val", "eval_sizes"})
#: Keys that never change the weights a run ends with.
WEIGHT_NEUTRAL = RESUMABLE_CHANGES | VALIDATION_OPTIONS


@dataclass
class TrainConfig:
    """Every option of ``msun train``; None means "derive from the recipe" (see ``resolve``)."""

    model: str = config_field(
        "resnet50", "Backbone (msun: ResNet/ResNeXt/WRN/DenseNet/VGG/MobileNetV2 families)."
    )
    method: str = config_field(
        "msun", "msun, mst (multi-scale training) or vanilla.", choices=METHODS
    )
    split_at: str | None = config_field(
        None,
        "First stage of the shared trunk (msun split-points lists them), auto (from CKA), or "
        "none: unset a --config file's (msun: the published one) [published].",
    )
    cka_from: str | None = config_field(
        None,
        "With --split-at auto: a saved ckascope compare result of this architecture (none: "
        "unset a --config file's).",
    )
    scales: tuple[int, ...] = config_field(
        (),
        "Nominal sizes of the subnets (msun) / training scales (mst)  [the paper's 32 128 224 "
        "scaled to the image size: 4 16 28 at 28 px, 9 37 64 at 64].",
    )
    data: str = config_field(
        "shapes",
        "ImageFolder root with train/ and val/, NAME:PATH (cifar10:~/data), fashionmnist "
        "(Debian's dataset-fashion-mnist), or shapes (synthetic).",
    )
    out: str = config_field("runs/msun", "Run folder: checkpoints, metrics, config.")
    num_classes: int | None = config_field(None, "Classes [from the data].")
    weights: str = config_field(
        "none", "Initialise from pretrained vanilla weights: none, default or an enum name."
    )
    epochs: int | None = config_field(None, "Epochs [90; MobileNetV2 300].")
    batch_size: int = config_field(256, "Global batch size (all processes and accumulation steps).")
    lr: float | None = config_field(
        None, "Peak learning rate [0.5/1024 images for ResNets, 0.1/256 otherwise]."
    )
    momentum: float = config_field(0.9, "SGD momentum.")
    weight_decay: float = config_field(2e-5, "Weight decay on all parameters.")
    warmup_epochs: float | None = config_field(
        None, "Linear warm-up epochs [5; 5/90 of a run shorter than 90 epochs: the recipe's share]."
    )
    warmup_factor: float = config_field(0.01, "Warm-up starts at this fraction of the peak lr.")
    min_lr_factor: float = config_field(0.01, "Cosine decay ends at this fraction of the peak lr.")
    image_size: int = config_field(224, "Training crop size (and the synthetic canvas).")
    crop_scale_min: float = config_field(0.08, "Smallest RandomResizedCrop area fraction.")
    grad_clip: float | None = config_field(
        None,
        "Gradient-norm clipping, 0 = off [1.0 for msun, off for vanilla and mst, as the authors].",
    )
    amp: str = config_field(
        "auto",
        "Mixed precision: auto (bf16 on CUDA, off on CPU), bf16, fp16, none.",
        choices=AMP_MODES,
    )
    si_weight: float = config_field(1.0, "lambda, weight of the scale-invariance loss.")
    si_threshold: float | None = config_field(
        None,
        "tau, dead zone of the scale-invariance loss (none: unset a --config file's) [0.01 "
        "ResNet family, else 0.001].",
    )
    si_pairs: str = config_field(
        "all",
        "Scale-invariance pairs: all, or largest (the authors' later revision).",
        choices=("all", "largest"),
    )
    bn: str = config_field(
        "shared",
        "BatchNorm: shared, or private: one set per training scale (mst, as RS-Nets) or per "
        "path in the shared trunk (msun); convolutions stay shared.",
        choices=BN_MODES,
    )
    distill: bool = config_field(
        False,
        "mst: each scale's logits also learn from the detached mean of all scales' logits "
        "(RS-Nets' ensemble distillation, docs/msun.md).",
    )
    accum_steps: int = config_field(1, "Gradient accumulation steps per optimiser step.")
    steps_per_epoch: int | None = config_field(None, "Cap on optimiser steps per epoch.")
    num_train: int | None = config_field(
        None, "Training images (random subset; synthetic: set size) [all; 20000 synthetic]."
    )
    num_val: int | None = config_field(
        None,
        "Validation images [a tenth of the training it follows, in forward passes: at least "
        "256, at most the validation set (2000 synthetic)].",
    )
    eval_sizes: str | None = config_field(
        None,
        "Test sizes for validation: start:stop:step or a comma list [the paper's 13 sizes "
        "scaled to --image-size: 1/7 .. 1 of it, 32:224:16 at 224].",
    )
    eval_every: int = config_field(1, "Validate every N epochs (and after the last).")
    save_every: int | None = config_field(None, "Also save last.pt every N optimiser steps.")
    workers: int = config_field(0, "DataLoader worker processes per training process.")
    seed: int = config_field(0, "Seed of initialisation, data order and augmentation.")
    deterministic: bool = config_field(
        False,
        "Deterministic algorithms (bit-exact resume on CPU; on CUDA sets CUBLAS_WORKSPACE_CONFIG, "
        "ops without a deterministic kernel warn by name).",
    )
    device: str = config_field("auto", "auto, cpu, cuda or cuda:N.")
    compile: bool = config_field(False, "torch.compile the training step.")
    tensorboard: bool = config_field(
        False, "Also log to TensorBoard (needs the tensorboard package)."
    )
    init_from: str | None = config_field(
        None,
        "Fine-tune from this checkpoint (msun or torchvision); a self-describing one sets the "
        "network: its --model, --method and --bn.",
    )
    linear_probe: bool = config_field(False, "With --init-from: train only the new classifier.")

    def __post_init__(self) -> None:
        if not self.scales:  # not given: the paper's, at this image size
            self.scales = nominal_scales(self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able values (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


FIELDS = {f.name: f for f in fields(TrainConfig)}


#: A config file is a page of options: anything larger is not one (and is not read whole).
MAX_CONFIG_BYTES = 1 << 20


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases.

    Aliases let a few lines expand into an exponentially large document (the "billion laughs");
    a page of options never needs them.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(
                f"aliases (*{event.anchor}) are not supported in config files {event.start_mark}"
            )
        return super().compose_node(parent, index)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML mapping of option names (dashes or underscores) to values.

    Raises:
        InputError: No such file (or a folder), a file too large, not UTF-8 text, not YAML, YAML with
            aliases or nested too deep, or not a mapping of option names.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"config file {p} is a folder, not a YAML file. Hint: {_file_in(p)}")
    if not p.is_file():
        raise InputError(
            f"config file {p} does not exist. Hint: check the path (a run's options are its "
            "folder's config.yaml)"
        )
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{p} is {p.stat().st_size} bytes, too large for a config file")
    try:
        data = yaml.load(p.read_bytes().decode("utf-8"), Loader=_ConfigLoader) or {}
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text (byte {e.start}). Hint: give a YAML file") from e
    except yaml.YAMLError as e:
        raise InputError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from e
    except RecursionError as e:
        raise InputError(f"{p} nests too deep for a config file of options") from e
    if not isinstance(data, dict):
        raise InputError(f"{p} must hold a mapping of option: value, got {type(data).__name__}")
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise InputError(f"{p}: option names are words, got the key {reprlib.repr(bad)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _file_in(folder: Path) -> str:
    """What to give instead of a folder: its run's config.yaml where it holds one."""
    if (folder / "config.yaml").is_file():
        return f"give {folder / 'config.yaml'}, the options of the run in it"
    return "give the YAML file itself"


def nominal_scales(image_size: int) -> tuple[int, ...]:
    """The paper's nominal sizes 32, 128, 224 scaled to ``image_size`` (4, 16, 28 for 28).

    The default of ``--scales``: the subnets keep the paper's ratios to the image size, so a
    small-image run does not train a path at 224 px on images upsampled from 28.
    """
    return tuple(sorted({max(1, round(image_size * s / 224)) for s in (32, 128, 224)}))


def upsampled_scales(cfg: TrainConfig) -> list[int]:
    """The training scales above the image size, to which each crop is upsampled.

    An MSUN path or an MST scale there sees no detail its crop lacks (``nominal_scales``, the
    default, ends at the image size). None for vanilla, which trains at the image size, nor for
    fine-tuning, whose network is the checkpoint's.
    """
    if cfg.method == "vanilla" or cfg.init_from is not None:
        return []
    return [s for s in cfg.scales if s > cfg.image_size]


def merge(*layers: Mapping[str, Any]) -> TrainConfig:
    """Defaults, then each mapping in turn (later ones win); unknown keys are refused."""
    values: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            values[key] = _option(key, value)
    return TrainConfig(**values)


def read_options(path: str | Path) -> dict[str, Any]:
    """A config file's options (``load_yaml``), each value as its option's type.

    Raises:
        InputError: What ``load_yaml`` refuses, an unknown option or a value its option does
            not take, naming the file.
    """
    options = load_yaml(path)
    try:
        return {key: _option(key, value) for key, value in options.items()}
    except InputError as e:
        raise InputError(f"{path}: {e}") from None


def _option(key: str, value: Any) -> Any:
    """``value`` as option ``key``'s type (``coerce``); an unknown ``key`` is refused."""
    if key not in FIELDS:
        raise InputError(hint_close(key, FIELDS, what="config key"))
    return coerce(key, value)


def option_type(key: str) -> tuple[Any, bool]:
    """The type of option ``key`` and whether it may be None (``int | None`` -> (int, True))."""
    hint = typing.get_type_hints(TrainConfig)[key]
    if isinstance(hint, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None)), True
    return hint, False


def coerce(key: str, value: Any) -> Any:
    """``value`` as the type of option ``key`` (YAML reads ``1e-3`` as a string, for one).

    Nothing becomes a string by ``str()``: a list given for a path or a name is refused.

    Raises:
        InputError: A value that is not of that type, naming the option and what it takes.
    """
    kind, optional = option_type(key)
    if value is None and optional:
        return None
    try:
        return _as(kind, value)
    except (TypeError, ValueError, OverflowError):
        name, written = _KINDS[typing.get_origin(kind) or kind]
        flag = key.replace("_", "-")
        raise InputError(
            f"{flag} takes {name}, got {_brief(value)}. Hint: give {flag} {written}"
        ) from None


#: Each option type in a refusal's words, and how a value of it is written.
_KINDS: dict[type, tuple[str, str]] = {
    int: ("int", "a whole number, such as 8"),
    float: ("float", "a number, such as 0.1 or 1e-3"),
    bool: ("bool", "true or false"),
    str: ("str", "text, such as a name or a path"),
    tuple: ("integers", "integers, such as 32 128 224"),
}


def _brief(value: Any) -> str:
    """A value for an error message: scalars as they are, containers by type and size only."""
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    return reprlib.repr(value)


def _as(kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
        return tuple(_as(int, v) for v in items)
    if kind is bool or kind is str:
        if not isinstance(value, kind):
            raise TypeError(value)
        return value
    if isinstance(value, (bool, list, tuple, dict, set)):
        raise TypeError(value)
    if kind is int and isinstance(value, float):
        raise TypeError(value)
    return kind(value)


def parse_sizes(text: str) -> list[int]:
    """``32:224:16`` (start:stop:step, stop included) or ``32,64,128`` to a list of sizes."""
    try:
        if ":" in text:
            start, stop, step = (int(t) for t in text.split(":"))
            sizes = list(range(start, stop + 1, step))
        else:
            sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise InputError(
            f"bad sizes {text!r}. Hint: use start:stop:step (32:224:16) or 32,64,128"
        ) from e
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_SCALE:
        raise InputError(f"bad sizes {text!r}: need at least one size, each in 1..{MAX_SCALE}")
    twice = sorted({size for size in sizes if sizes.count(size) > 1})
    if twice:
        raise InputError(
            f"bad sizes {text!r}: {', '.join(map(str, twice))} listed twice (a mean over sizes "
            "would count it twice). Hint: list each size once"
        )
    return sizes


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


#: Options of MSUN's scale-invariance loss, with their defaults: another method refuses others.
MSUN_ONLY: dict[str, Any] = {"si_weight": 1.0, "si_pairs": "all", "si_threshold": None}

#: The image sizes msun takes, in train, eval and flops alike: ckascope's. A run's checkpoints
#: record its image size as the default of ``ckascope compare --image-size``, which takes
#: MIN_IMAGE_SIZE..MAX_SCALE (and ignores a recorded size outside it); MAX_SCALE caps the test
#: sizes too.
IMAGE_SIZES = (MIN_IMAGE_SIZE, MAX_SCALE)

#: The largest float32 (torch.finfo(torch.float32).max, without importing torch here).
FLOAT32_MAX = 3.4028234663852886e38

#: The range of every numeric option: a test and how to say it.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (lambda v: v >= 1, ">= 1") for k in ("batch_size", "accum_steps", "eval_every")},
    "image_size": (
        lambda v: IMAGE_SIZES[0] <= v <= IMAGE_SIZES[1],
        f"in {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]}",
    ),
    "scales": (lambda v: all(1 <= s <= MAX_SCALE for s in v), f"sizes in 1..{MAX_SCALE}"),
    **{
        k: (_optional(lambda v: v >= 1), ">= 1")
        for k in ("epochs", "steps_per_epoch", "num_train", "num_val", "save_every")
    },
    "num_classes": (_optional(lambda v: v >= 2), ">= 2"),
    "seed": (lambda v: 0 <= v < 2**32, "in 0 .. 2**32 - 1"),
    "workers": (lambda v: v >= 0, ">= 0"),
    # The optimiser hands them to float32 kernels, which cannot take a larger number.
    "lr": (_optional(lambda v: 0 < v <= FLOAT32_MAX), f"> 0 and at most {FLOAT32_MAX:.4g}"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v <= FLOAT32_MAX, f">= 0 and at most {FLOAT32_MAX:.4g}"),
    "warmup_epochs": (_optional(lambda v: v >= 0), ">= 0"),
    "warmup_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_lr_factor": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "crop_scale_min": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "grad_clip": (_optional(lambda v: v >= 0), ">= 0 (0 = off)"),
    "si_weight": (lambda v: v >= 0, ">= 0"),
    "si_threshold": (_optional(lambda v: v >= 0), ">= 0"),
}


def check(
    cfg: TrainConfig, sources: Mapping[str, str] | None = None, *, resume: bool = False
) -> None:
    """Raises InputError for values no run can use, before any work.

    Args:
        cfg: The merged config.
        sources: The config file each option came from that the command line did not give:
            where it conflicts with another, the message names the file and how to unset it
            from the command line (a run's own config.yaml sets MSUN's options, for one).
        resume: The run continues from its checkpoint, whose precision it keeps (a run
            started with ``--amp fp16`` on a GPU may go on on a CPU, slowly).
    """
    sources = sources or {}
    _check_values(cfg, sources)
    _check_method(cfg, sources)
    _check_bn(cfg)
    if cfg.cka_from is not None and cfg.split_at != "auto":
        raise InputError(
            f"{_named(['cka_from'], cfg, sources)} is the analysis behind --split-at auto. "
            f"Hint: {' or '.join(['add --split-at auto', *_unset(['cka_from'], sources)])}"
        )
    if cfg.linear_probe and cfg.init_from is None:
        raise InputError(
            "--linear-probe trains only the classifier of a trained model. Hint: add --init-from CKPT"
        )
    if cfg.eval_sizes is not None:
        parse_sizes(cfg.eval_sizes)
    if not resume:
        _check_amp(cfg)
    _check_sizes(cfg)


def _check_values(cfg: TrainConfig, sources: Mapping[str, str]) -> None:
    """Each option on its own: one of its choices, a finite number, in its range."""
    choices = {k: f.metadata["choices"] for k, f in FIELDS.items() if "choices" in f.metadata}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise _unfit(key, f"one of {', '.join(allowed)}", cfg, sources)
    for key in FIELDS:
        value = getattr(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise _unfit(key, "a finite number", cfg, sources)
    for key, (test, wanted) in RANGES.items():
        if not test(getattr(cfg, key)):
            raise _unfit(key, wanted, cfg, sources)


def _unfit(key: str, wanted: str, cfg: TrainConfig, sources: Mapping[str, str]) -> InputError:
    """The refusal of option ``key``'s value, ``wanted`` saying what it must be.

    A value a config file set names the file (as ``_named`` does) and how to mend it there.
    """
    value = getattr(cfg, key)
    shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
    if key not in sources:
        shown = repr(value) if isinstance(value, str) else shown
        return InputError(f"{_flag(key)} must be {wanted}, got {shown}")
    return InputError(
        f"{_flag(key)} {shown} (from {sources[key]}) must be {wanted}. Hint: correct "
        f"{key} in {sources[key]}, or give {_flag(key)} on the command line (flags win)"
    )


def _check_method(cfg: TrainConfig, sources: Mapping[str, str]) -> None:
    """Refuses MSUN's options (its split, its scale-invariance loss) for another method."""
    if cfg.method == "msun":
        return
    split = [k for k in ("split_at", "cka_from") if getattr(cfg, k) is not None]
    loss = [k for k, v in MSUN_ONLY.items() if getattr(cfg, k) != v]
    if split:  # named with the loss's options: a run's config.yaml sets both at once
        keys = split + loss
        raise InputError(
            f"{_named(keys, cfg, sources)} {_shape(keys)} an MSUN; --method {cfg.method} has "
            f"no subnets. Hint: {_drop(keys, sources)}, or train --method msun"
        )
    if loss:
        raise InputError(
            f"{_named(loss, cfg, sources)} {_shape(loss)} MSUN's scale-invariance loss; "
            f"--method {cfg.method} has none. Hint: {_drop(loss, sources)} (or use --method msun)"
        )


def _flag(key: str) -> str:
    """The command-line flag of option ``key``: ``split_at`` -> ``--split-at``."""
    return "--" + key.replace("_", "-")


def _shape(keys: list[str]) -> str:
    return "shapes" if len(keys) == 1 else "shape"


def _named(keys: list[str], cfg: TrainConfig, sources: Mapping[str, str]) -> str:
    """Options for a message: a flag as given, or with its value and the file that set it."""
    return ", ".join(
        f"{_flag(k)} {getattr(cfg, k)} (from {sources[k]})" if k in sources else _flag(k)
        for k in keys
    )


def _unset_word(key: str) -> str:
    """What unsets option ``key`` on the command line: none (``X | None``), else its default."""
    default = FIELDS[key].default
    return "none" if default is None else str(default)


def _drop(keys: list[str], sources: Mapping[str, str]) -> str:
    """The fix for options that do not belong: drop the flags given, unset what a file set."""
    flags = [_flag(k) for k in keys if k not in sources]
    fixes = [f"drop {' '.join(flags)}"] if flags else []
    return " and ".join([*fixes, *_unset(keys, sources)])


def _unset(keys: list[str], sources: Mapping[str, str]) -> list[str]:
    """["give --split-at none to unset what c.yaml sets"] for the keys a file set; else []."""
    filed = [k for k in keys if k in sources]
    if not filed:
        return []
    flags = " ".join(f"{_flag(k)} {_unset_word(k)}" for k in filed)
    return [f"give {flags} to unset what {', '.join(sorted({sources[k] for k in filed}))} sets"]


def _check_amp(cfg: TrainConfig) -> None:
    """Refuses ``--amp fp16`` on a CPU, before any work.

    Float16 autocast is a CUDA recipe (with its loss scaler); on a CPU it runs many times slower
    than float32 and the scaler's skipped steps make PyTorch warn about the schedule.
    """
    if cfg.amp != "fp16" or cfg.device not in ("auto", "cpu"):
        return
    import torch  # only a run is checked here: torch is loaded by then

    if cfg.device == "cpu" or not torch.cuda.is_available():
        raise InputError(
            "--amp fp16 is mixed precision for CUDA GPUs, and this run is on the CPU (no GPU "
            "here, or --device cpu). Hint: use --amp bf16, or --amp none (the CPU's default)"
        )


def _check_sizes(cfg: TrainConfig) -> None:
    """Refuses an image size or scales the network would shrink to nothing, before any work.

    Vanilla and MST run the network at the image size (MST brings each scale back up to it).
    An MSUN runs path k at ``scales[k]``, in training and in validation (whose ``upsample``
    protocol resizes every test size to it): its largest path is the vanilla network, and each
    subnet is checked as the MSUN is built, on the meta device (the split an ``auto`` run
    chooses is checked when it is). A fine-tuned network is the checkpoint's, as trained.
    """
    if cfg.init_from is not None:
        return
    from msun.model import check_scales, check_structure  # torch, loaded by then

    if cfg.method != "msun":
        check_side(cfg.model, cfg.image_size, f"--image-size is {cfg.image_size}", "--image-size")
        return
    scales = check_scales(cfg.scales)
    check_side(cfg.model, scales[-1], *_largest_path(scales, cfg.image_size))
    if cfg.split_at != "auto":
        check_structure(cfg.model, cfg.split_at, scales, cfg.bn)


def _largest_path(scales: tuple[int, ...], image_size: int) -> tuple[str, str]:
    """Where an MSUN's largest path size comes from, in words, and the option that raises it."""
    listed = " ".join(map(str, scales))
    if scales == nominal_scales(image_size):  # the default --scales, from the image size
        where = f"the default --scales at --image-size {image_size}: {listed}"
        return f"an MSUN's largest path runs at its largest scale ({where})", "--image-size"
    where = f"--scales {listed}"
    return f"an MSUN's largest path runs at its largest scale ({where})", "the largest of --scales"


def check_side(arch: str, side: int, runs: str, fix: str) -> None:
    """Refuses a square input side ``arch``'s vanilla network shrinks to nothing.

    Args:
        arch: The architecture.
        side: The side it would run at.
        runs: What runs at ``side``, in the user's words: "--image-size is 28".
        fix: The option the hint raises: "--image-size", "the largest of --scales".
    """
    from msun.backbones import too_small  # torch, loaded by then

    least = too_small(arch, side)
    if least is not None:
        raise InputError(
            f"{arch} needs images of at least {least} px (a smaller one shrinks to nothing in "
            f"its down-sampling); {runs}. Hint: make {fix} {least} or more"
        )


def _check_bn(cfg: TrainConfig) -> None:
    """The BatchNorm options that make no network.

    Private BatchNorm needs several scales; distillation needs MST's several outputs; a
    fine-tuned network keeps the BatchNorm it was trained with (a ``--bn`` other than the
    checkpoint's is refused once it is read, ``msun.train.check_init_flags``).
    """
    if cfg.init_from is not None and cfg.distill:
        raise InputError(
            "--init-from fine-tunes the checkpoint's network as it is; --distill trains MST's "
            "scales from the start. Hint: drop --distill"
        )
    if cfg.bn == "private" and cfg.method == "vanilla":
        raise InputError(
            "--bn private keeps one BatchNorm set per training scale; --method vanilla trains "
            "at one. Hint: use --method mst (RS-Nets-style) or --method msun"
        )
    if cfg.distill and cfg.method != "mst":
        raise InputError(
            "--distill is ensemble distillation across MST's scales (RS-Nets); --method "
            f"{cfg.method} has no such ensemble. Hint: drop --distill, or use --method mst"
        )


def default_warmup(epochs: int) -> float:
    """The recipe's warm-up, 5 epochs of 90, kept at that share in shorter runs."""
    return min(5.0, epochs * 5 / 90)


def paper_sizes(image_size: int) -> list[int]:
    """The paper's 13 test sizes (32, 48, ..., 224 for 224) scaled to ``image_size``.

    1/7 .. 1 of the training image size in 12 equal steps, rounded (4, 6, ..., 28 for 28);
    sizes that round to the same pixel count appear once.
    """
    return sorted({max(1, round(image_size * (2 + i) / 14)) for i in range(13)})


def sizes_count(sizes: Sequence[int]) -> str:
    """How many test sizes a progress line covers, in words: "13 sizes", "1 size"."""
    return f"{len(sizes)} size{'' if len(sizes) == 1 else 's'}"


def sizes_text(sizes: list[int]) -> str:
    """``start:stop:step`` for evenly spaced sizes, else a comma list (``parse_sizes``' input)."""
    steps = {b - a for a, b in itertools.pairwise(sizes)}
    if len(steps) == 1:
        return f"{sizes[0]}:{sizes[-1]}:{steps.pop()}"
    return ",".join(map(str, sizes))


def resolve(cfg: TrainConfig, *, num_classes: int) -> TrainConfig:
    """The config with the derived defaults filled in (the split point is the model's to fill).

    Epochs, learning rate and scale-invariance dead zone come from the architecture's recipe.

    Args:
        cfg: The merged config.
        num_classes: Classes found in the training data (used unless set).

    Raises:
        InputError: ``cfg.model`` is not supported.
    """
    # Imported here: msun.recipes loads torch, which --help and usage errors must not wait for.
    from msun.recipes import recipe_for

    recipe = recipe_for(cfg.model)
    epochs = cfg.epochs or recipe.epochs
    return dataclasses.replace(
        cfg,
        num_classes=cfg.num_classes or num_classes,
        epochs=epochs,
        warmup_epochs=default_warmup(epochs) if cfg.warmup_epochs is None else cfg.warmup_epochs,
        lr=cfg.lr or recipe.lr_at(cfg.batch_size),
        si_threshold=(
            recipe.si_threshold
            if cfg.si_threshold is None and cfg.method == "msun"
            else cfg.si_threshold
        ),
        grad_clip=(1.0 if cfg.method == "msun" else 0.0)
        if cfg.grad_clip is None
        else cfg.grad_clip,
        eval_sizes=cfg.eval_sizes or sizes_text(paper_sizes(cfg.image_size)),
    )


def differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    allowed: frozenset[str] = RESUMABLE_CHANGES,
) -> list[str]:
    """``key: saved -> current`` for every key that differs and may not (not in ``allowed``).

    MSUN's loss options change nothing of another method's run (runs made before they were
    refused for vanilla and MST saved them anyway).
    """
    out = []
    plain = "msun" not in (saved.get("method"), current.get("method"))
    for key in sorted(set(saved) | set(current)):
        if key in allowed or (plain and key in MSUN_ONLY):
            continue
        a, b = saved_value(saved, key), saved_value(current, key)
        if _comparable(key, a) != _comparable(key, b):
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _comparable(key: str, value: Any) -> Any:
    """``value`` in a form where equal settings compare equal (``4:28:12`` is ``4,16,28``)."""
    if key == "eval_sizes" and isinstance(value, str):
        return parse_sizes(value)
    return list(value) if isinstance(value, tuple) else value


#: Options added after runs were made: a run saved without one ran with this value.
ADDED_LATER: dict[str, Any] = {"bn": "shared", "distill": False}


def saved_value(config: Mapping[str, Any], key: str) -> Any:
    """Option ``key`` of a saved config; an option added later has the value runs had then."""
    return config.get(key, ADDED_LATER.get(key))


def without_split_record(options: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's ``options`` less a ``cka_from`` that only records where its split came from.

    A ``--split-at auto`` run's config.yaml (``records_a_run``) holds the split it chose and
    the analysis it chose it from: read again (``--config`` of it), the file repeats that
    split, as ``--resume`` does (``run_options``), and its ``cka_from`` asks for no analysis.
    The ``cka_from`` stays where a split is still to be chosen (``--split-at auto`` given or in
    the file), in a file of the user's own (a recipe) and where the file names no split (then
    it is refused, naming the file); a ``--cka-from`` in ``given`` (the command line) is the
    user's own request.
    """
    split = given["split_at"] if "split_at" in given else options.get("split_at")
    chosen = options.get("split_at") not in (None, "auto") and records_a_run(options)
    if "cka_from" in given or split == "auto" or not chosen:
        return dict(options)
    return {k: v for k, v in options.items() if k != "cka_from"}


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml of ``msun train``'s: every option a run records."""
    try:
        options = load_yaml(path)
        merge(options)
    except InputError:
        return False
    return records_a_run(options)


def records_a_run(options: Mapping[str, Any]) -> bool:
    """Whether a config file's ``options`` are a run's: every option a run records."""
    return set(FIELDS) - set(ADDED_LATER) <= set(options)


def run_options(folder: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the run in ``folder`` (its config.yaml), for ``--resume`` to start from.

    The options ``given`` (flags, a config file) go on top, and the resume compares the result
    with the run's checkpoint, so a given option that differs is refused by name. Left out:
    ``out`` (the folder is where the run is now) and ``cka_from`` (it fed the run's
    ``--split-at auto``, whose choice the config records as its split). None of the run's
    options when there is no such config.yaml (the resume then stops on its missing
    checkpoint), or when ``given`` asks for another network (``model``, ``method``): the run's
    split point and MSUN-only options would be refused for it before the resume could name
    what differs, so that is refused here, naming only what was asked.

    Raises:
        InputError: ``given`` asks for another ``model`` or ``method`` than the run's.
    """
    path = folder / "config.yaml"
    if not is_run_config(path):
        return {}
    options = load_yaml(path)
    asked = {k: given[k] for k in ("model", "method") if k in given}
    other = [f"{k}: {options[k]!r} -> {v!r}" for k, v in asked.items() if v != options[k]]
    if other:
        raise InputError(
            f"--resume continues the run in {folder}, another network ({'; '.join(other)}). "
            "Hint: leave those options out, or train into a new --out"
        )
    return {k: v for k, v in options.items() if k not in ("out", "cka_from")}


def dump_yaml(cfg: TrainConfig) -> str:
    """The config as YAML text."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
