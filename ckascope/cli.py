"""The ``ckascope`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckascope import __version__
from ckascope.cliutils import FriendlyGroup
from ckascope.vocab import DEFAULT_THRESHOLD, KERNELS, MAX_SCALE, PROTOCOLS, RESIZE_MODES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=FriendlyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ckascope")
def main() -> None:
    """See how every layer of a CNN reacts when the same images arrive at another scale."""


def _options(f: Any) -> Any:
    options = [
        click.option("--model", "-m", help="torchvision model name (ckascope models lists them)."),
        click.option(
            "--weights",
            default="default",
            show_default=True,
            help="none | default | enum name (IMAGENET1K_V2).",
        ),
        click.option(
            "--checkpoint",
            type=click.Path(path_type=Path),
            help="Local checkpoint (state dict for --model, or a self-describing one).",
        ),
        click.option(
            "--model-b", help="Second model: compare two models at --scale instead of two scales."
        ),
        click.option(
            "--weights-b", default="default", show_default=True, help="Weights of the second model."
        ),
        click.option(
            "--checkpoint-b",
            type=click.Path(path_type=Path),
            help="Checkpoint of the second model.",
        ),
        click.option(
            "--num-classes",
            type=click.IntRange(min=2),
            help="Classes of randomly initialised models (default 1000).",
        ),
        click.option(
            "--data",
            help="ImageFolder dir, NAME:PATH (cifar10:~/data, fashionmnist:DIR of idx files), "
            "fashionmnist (Debian's dataset-fashion-mnist; 28 px), or omit for the synthetic set.",
        ),
        click.option(
            "--scales",
            type=click.IntRange(1, MAX_SCALE),
            nargs=2,
            help="Two input scales in px  [default: base/7 and the image size, e.g. 32 224; "
            "4 28 for Fashion-MNIST with --weights none].",
        ),
        click.option(
            "--scale",
            type=click.IntRange(1, MAX_SCALE),
            help="Input scale when comparing two models  [default: the image size].",
        ),
        click.option(
            "--layers",
            default="blocks",
            show_default=True,
            help="Preset (blocks|stages|leaves), names or patterns, comma-separated.",
        ),
        click.option("--layers-b", help="Layers of the second model (default: --layers)."),
        click.option("--kernel", type=click.Choice(KERNELS), default="linear", show_default=True),
        click.option(
            "--sigma-frac",
            type=float,
            default=1.0,
            show_default=True,
            help="RBF bandwidth: sigma² = f² · median D².",
        ),
        click.option(
            "--bandwidth",
            type=click.Choice(["batch", "first"]),
            default="batch",
            show_default=True,
            help="RBF sigma per batch, or fixed from the first batch.",
        ),
        click.option(
            "--weighting",
            type=click.Choice(["batch", "examples"]),
            default="batch",
            show_default=True,
            help="Weight of a short batch.",
        ),
        click.option(
            "--protocol",
            type=click.Choice(PROTOCOLS),
            default="upsample",
            show_default=True,
            help="upsample: back to the image size; native: fed at the scale.",
        ),
        click.option(
            "--resize-mode", type=click.Choice(RESIZE_MODES), default="bilinear", show_default=True
        ),
        click.option("--antialias/--no-antialias", default=False, show_default=True),
        click.option(
            "--image-size",
            type=click.IntRange(4, MAX_SCALE),
            help="Centre-crop size of the base images  [default: the size pretrained weights "
            "expect (299 inception_v3), else the data's native size (28 for mnist/fashionmnist/"
            "kmnist, 32 cifar/svhn, 96 stl10), else 224].",
        ),
        click.option(
            "--resize-size",
            type=click.IntRange(4, MAX_SCALE),
            help="Short side before the centre crop  [default: image size x 256/224; the base "
            "size (whole image) for the small-image sets].",
        ),
        click.option("--batch-size", type=int, default=128, show_default=True),
        click.option(
            "--num-images",
            type=click.IntRange(min=1),
            help="Random subset size per sweep [default: all; 1280 synthetic].",
        ),
        click.option(
            "--repeats",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Sweeps over random permutations (the paper: 10).",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N."
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="DataLoader worker processes.",
        ),
        click.option(
            "--tf32/--no-tf32",
            default=False,
            show_default=True,
            help="Let CUDA convolutions use TF32 (faster on Ampere and later, ~1e-3 off in CKA).",
        ),
        click.option(
            "--gram-dtype",
            type=click.Choice(["auto", "float32", "float64"]),
            default="auto",
            show_default=True,
        ),
        click.option(
            "--out",
            type=click.Path(path_type=Path),
            help="Output folder [default: ckascope-out/<model>_<a>-<b>, or the first free "
            "<...>-2, -3: a default never replaces a result].",
        ),
        click.option("--overwrite", is_flag=True, help="Let --out replace what its folder holds."),
        click.option("--no-figures", is_flag=True, help="Skip the PNG/PDF figures."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command(context_settings=CONTEXT)
@_options
def compare(**args: Any) -> None:
    """Layer-by-layer CKA of one model at two input scales, or of two models.

    \b
    Examples:
      ckascope compare --model resnet18 --weights none --scales 32 224
      ckascope compare --model resnet50 --data ~/imagenet/val --repeats 10
      ckascope compare --model resnet18 --weights none --data fashionmnist --scales 7 28
      ckascope compare --model resnet18 --model-b resnet34 --weights none --weights-b none
      ckascope compare --checkpoint run/last.pt --scales 32 224  # multi-path: each scale its path
    """
    from ckascope.commands import run_compare

    run_compare(args)


@main.command(name="models", context_settings=CONTEXT)
def models_command() -> None:
    """List the torchvision model names --model accepts."""
    from ckascope.models import list_models

    click.echo("\n".join(list_models()))


@main.command(name="suggest-split", context_settings=CONTEXT)
@click.option(
    "--from",
    "from_dir",
    type=click.Path(path_type=Path),
    help="A saved compare result (otherwise run one with the options below).",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_THRESHOLD,
    show_default=True,
    help="Minimum cross-scale CKA of the trunk's input.",
)
@click.option("--split-points", help="Comma-separated legal split points [the model family's].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@_options
def suggest_split_command(
    from_dir: Path | None, threshold: float, split_points: str | None, as_json: bool, **args: Any
) -> None:
    """Where to split a backbone into per-scale subnets and a shared trunk.

    The first legal split point whose trunk input has same-layer cross-scale CKA >= threshold:
    the scale-sensitive layers before it become per-scale subnets. The printed value is what
    a multi-scale trainer's --split-at takes.

    \b
    Examples:
      ckascope suggest-split --from ckascope-out/resnet50_32-224
      ckascope suggest-split --model resnet50 --scales 32 224 --data ~/imagenet/val
    """
    from ckascope.commands import run_suggest_split

    run_suggest_split(from_dir, threshold, split_points, as_json, args)
