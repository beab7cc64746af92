"""Every option of ``msun eval`` and ``msun flops``, as typed dataclasses.

Their command lines are generated from them (``ckascope.platform.config_options``), as ``msun
train``'s from ``msun.config.TrainConfig``: a field's type, default, help and range live in one
place. Plain values only (no torch), so ``--help`` and usage errors answer without importing
torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ckascope.platform import REQUIRED, InputError, MemoryFormat, Protocol, config_field
from msun.config import BN_MODES, IMAGE_SIZES


@dataclass(frozen=True)
class FlopsConfig:
    """Every option of ``msun flops``; None and () mean "derive it" (see the command)."""

    model: str = config_field(REQUIRED, "Backbone, e.g. resnet50.")
    split_at: str | None = config_field(None, "First stage of the shared trunk [published].")
    scales: tuple[int, ...] = config_field(
        (),
        "Nominal input size of each subnet, ascending  [default: the paper's 32 128 224 scaled "
        "to --image-size: 4 16 28 at 28].",
    )
    num_classes: int = config_field(1000, "Classes of the classifier (the head's size).", min=2)
    image_size: int | None = config_field(
        None,
        "The size vanilla runs every input at, and the training size the test sizes scale "
        "with  [default: the largest scale].",
        min=IMAGE_SIZES[0],
        max=IMAGE_SIZES[1],
    )
    eval_sizes: str | None = config_field(
        None,
        "Test sizes, start:stop:step or a list  [default: the paper's 13 sizes from "
        "image-size/7 to image-size: 32..224 at 224, 4..28 at 28].",
    )
    bn: str = config_field(
        "shared",
        "private: the trunk's BatchNorm holds one set per path (parameters grow, FLOPs do not).",
        choices=BN_MODES,
    )
    json: bool = config_field(False, "Print JSON to stdout instead of tables.", flag=True)


@dataclass(frozen=True)
class EvalConfig:
    """Every option of ``msun eval`` (the checkpoints are its arguments); None: the run's."""

    data: str | None = config_field(
        None,
        "ImageFolder root (its val/ is scored; a folder of class sub-folders alone is scored "
        "itself, with a note; one with train/ but no val/ is refused), NAME:PATH, "
        "fashionmnist, or shapes  [default: the first run's data].",
    )
    eval_sizes: str | None = config_field(
        None,
        "Test sizes, start:stop:step or a list  [default: the run's eval sizes, else the "
        "paper's 13 sizes from image-size/7 to image-size].",
    )
    protocol: Protocol = config_field(
        "upsample",
        "MSUN path input: resized to its nominal size (upsample, as for the paper's accuracy "
        "tables), or as it is (native); other networks (vanilla, MST, private BN too) always "
        "see the image at their training size, and are recorded as upsample.",
    )
    paths: Literal["all", "routed"] = config_field(
        "all", "Evaluate every path, or only the routed one."
    )
    image_size: int | None = config_field(
        None,
        "Centre-crop size of the test images [the run's image size].",
        min=IMAGE_SIZES[0],
        max=IMAGE_SIZES[1],
    )
    num_val: int | None = config_field(
        None,
        "Evaluate on this many of the images: the ones the (first) run's validation scored with "
        "the same --num-val; at most the set's size (more is refused)  [all; synthetic 2000].",
        min=1,
    )
    recalibrate_bn: int | None = config_field(
        None,
        "Before scoring each test size (and path), re-estimate every BatchNorm's statistics "
        "on this many training images brought to that size (FixRes-style; weights untouched, "
        "statistics restored after; uses training images at evaluation time). At most the "
        "training set's size (synthetic: the run's --num-train, else 20000): more is refused. "
        "Every checkpoint needs BatchNorm layers.",
        min=2,
    )
    batch_size: int = config_field(
        64,
        "Images per batch (and per BatchNorm estimate with --recalibrate-bn, which needs 2 or "
        "more).",
        min=1,
    )
    workers: int = config_field(0, "DataLoader worker processes.", min=0)
    device: str = config_field("auto", "auto, cpu, cuda or cuda:N.")
    memory_format: MemoryFormat = config_field(
        "auto",
        "Layout of the forward passes (auto: channels_last for CNNs on a CPU, faster there; "
        "recorded in eval.json).",
    )
    out: Path | None = config_field(
        None,
        "Folder for eval.csv, eval.json, figure4.png/pdf  [default: msun-eval, or the first "
        "free msun-eval-2, -3, ...: a default never replaces a result].",
    )
    overwrite: bool = config_field(
        False,
        "Let --out replace an earlier msun eval output (never a folder of other files).",
        flag=True,
    )


def check_eval(cfg: EvalConfig) -> None:
    """Refuses flag combinations no evaluation can run, before any checkpoint is read.

    Raises:
        InputError: ``--recalibrate-bn`` with ``--batch-size 1`` (a batch of one image gives
            BatchNorm no variance to estimate), or ``--overwrite`` without ``--out`` (the
            default folder never replaces an output, so it would do nothing).
    """
    if cfg.overwrite and cfg.out is None:
        raise InputError(
            "--overwrite lets --out replace an earlier eval output, and without --out the "
            "tables go to a new default folder that never replaces one. Hint: add --out "
            "FOLDER, or drop --overwrite"
        )
    if cfg.recalibrate_bn and cfg.batch_size < 2:
        raise InputError(
            f"--recalibrate-bn estimates BatchNorm statistics per batch, and --batch-size "
            f"{cfg.batch_size} gives batches of one image, which have no variance. Hint: give "
            "--batch-size 2 or more with --recalibrate-bn"
        )
