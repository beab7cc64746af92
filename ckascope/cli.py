"""The ``ckascope`` command line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table
from torch import nn

from ckascope import __version__, plugins
from ckascope.cliutils import FriendlyGroup, make_console
from ckascope.compare import (
    MAX_SCALE,
    PROTOCOLS,
    RESIZE_MODES,
    base_size_for,
    compare_models,
    compare_scales,
    default_scales,
)
from ckascope.distributed import init_distributed
from ckascope.errors import InputError, WeightsUnavailableError
from ckascope.kernels import KERNELS
from ckascope.models import build_model, checkpoint_label, load_checkpoint, weights_input_size
from ckascope.plot import save_figures
from ckascope.result import CKAResult, check_output_dir, next_free
from ckascope.split import DEFAULT_THRESHOLD, SplitCandidate, split_table, suggest_split

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=FriendlyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ckascope")
def main() -> None:
    """See how every layer of a CNN reacts when the same images arrive at another scale."""


def parse_layers(text: str) -> str | list[str]:
    """``blocks`` stays a preset; ``a,b.*`` becomes a list of names and patterns."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError("--layers is empty. Hint: use a preset (blocks, stages, leaves) or names")
    return items[0] if len(items) == 1 else items


def resolve_model(
    name: str | None,
    weights: str,
    checkpoint: Path | None,
    num_classes: int | None,
    seed: int,
    suffix: str = "",
) -> nn.Module:
    """The model a set of --model/--weights/--checkpoint options names.

    ``suffix`` "-b" names the second model's options (--weights-b ...) in the hints.
    """
    if checkpoint is not None:
        return load_checkpoint(checkpoint, arch=name)
    if name is None:
        raise InputError(
            "no model given. Hint: pass --model NAME (e.g. resnet50) or --checkpoint FILE"
        )
    try:
        return build_model(name, weights, num_classes=num_classes, seed=seed)
    except WeightsUnavailableError as e:
        if not suffix:
            raise
        for flag in ("--weights", "--checkpoint"):
            e.args = (str(e).replace(f"{flag} ", f"{flag}{suffix} "),)
        raise


def model_label(name: str | None, checkpoint: Path | None) -> str:
    """How a model is called in settings and figures (a run's folder for last.pt / best.pt)."""
    if name or checkpoint is None:
        return name or "model"
    return checkpoint_label(checkpoint)


def default_out(args: dict[str, Any]) -> Path:
    """ckascope-out/<model>_<a>-<b> or ckascope-out/<a>_vs_<b>_<scale>."""
    a = model_label(args["model"], args["checkpoint"])
    if args["model_b"] or args["checkpoint_b"]:
        b = model_label(args["model_b"], args["checkpoint_b"])
        return Path("ckascope-out") / f"{a}_vs_{b}_{args['scale']}"
    return Path("ckascope-out") / f"{a}_{args['scales'][0]}-{args['scales'][1]}"


def summary_table(result: CKAResult) -> Table:
    """Same-layer CKA per layer, or for two models each row's best-matching column."""
    table = Table(title="Cross-scale CKA" if result.has_diagonal else "Best match per layer")
    if result.has_diagonal:
        spread = result.repeats > 1  # one sweep has no spread to show
        for column in ("layer", "CKA", "± std")[: 3 if spread else 2]:
            table.add_column(column, justify="left" if column == "layer" else "right")
        for row in result.diagonal().itertuples():
            table.add_row(
                str(row.layer), f"{row.mean:.4f}", *([f"{row.std:.4f}"] if spread else [])
            )
        return table
    for column in ("layer a", "best layer b", "CKA"):
        table.add_column(column)
    for i, name in enumerate(result.layers_a):
        row = np.nan_to_num(result.matrix[i], nan=-np.inf)
        j = int(row.argmax())
        table.add_row(name, result.layers_b[j], f"{result.matrix[i, j]:.4f}")
    return table


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
            help="Local checkpoint (state dict for --model, or an MSUN checkpoint).",
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
            help="Two input scales in px  [default: base/7 and base: 32 224, or 4 28 on "
            "Fashion-MNIST].",
        ),
        click.option(
            "--scale",
            type=click.IntRange(1, MAX_SCALE),
            help="Input scale when comparing two models  [default: the base size].",
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
            help="upsample: back to the base size; native: fed at the scale.",
        ),
        click.option(
            "--resize-mode", type=click.Choice(RESIZE_MODES), default="bilinear", show_default=True
        ),
        click.option("--antialias/--no-antialias", default=False, show_default=True),
        click.option(
            "--base-size",
            type=click.IntRange(4, MAX_SCALE),
            help="Centre-crop size of the base images  [default: the size pretrained weights "
            "expect (299 inception_v3), else the data's native size (28 for mnist/fashionmnist/"
            "kmnist, 32 cifar/svhn, 96 stl10), else 224].",
        ),
        click.option(
            "--resize-size",
            type=click.IntRange(4, MAX_SCALE),
            help="Short side before the centre crop  [default: base size x 256/224; the base "
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
      ckascope compare --checkpoint runs/msun/last.pt --scales 32 224   # each scale its path
    """
    two_models = _check_sides(args)
    out = args["out"] or next_free(default_out(args))  # a default never replaces a result
    check_output_dir(out, args["overwrite"])
    result, is_main = _analyse(args, two_models)
    if is_main:
        _save(result, out, args)
        _report(result, out)


def _check_sides(args: dict[str, Any]) -> bool:
    """Whether two models are compared; fills in the default scales of one model."""
    two_models = bool(args["model_b"] or args["checkpoint_b"])
    if two_models and args["scales"]:
        raise InputError("--scales compares two scales of one model; with --model-b use --scale S")
    # The size pretrained weights expect (299 for inception_v3) comes before the data's own.
    expected = (
        weights_input_size(args["model"], args["weights"]) if not args["checkpoint"] else None
    )
    args["base_size"] = base_size_for(args["data"], args["base_size"] or expected)
    args["scales"] = tuple(args["scales"] or default_scales(args["base_size"]))
    args["scale"] = args["scale"] or args["base_size"]
    return two_models


def _analyse(args: dict[str, Any], two_models: bool) -> tuple[CKAResult, bool]:
    """Runs the comparison the options describe (under torchrun: this process's share)."""
    dist = init_distributed(args["device"])
    return _run(args, two_models, dist.rank, dist.world_size, dist.device), dist.is_main


def _save(result: CKAResult, out: Path, args: dict[str, Any]) -> None:
    result.save(
        out, overwrite=args["overwrite"], extra=None if args["no_figures"] else _figures(result)
    )


def _figures(result: CKAResult) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        save_figures(result, folder)

    return write


def _run(args: dict[str, Any], two_models: bool, rank: int, world: int, device: Any) -> CKAResult:
    model_a = resolve_model(
        args["model"], args["weights"], args["checkpoint"], args["num_classes"], args["seed"]
    )
    settings = {
        "model": model_label(args["model"], args["checkpoint"]),
        "weights": args["weights"],
        "checkpoint": str(args["checkpoint"]) if args["checkpoint"] else None,
        "data": args["data"] or "shapes",
    }
    common = {
        "layers": parse_layers(args["layers"]),
        "protocol": args["protocol"],
        "base_size": args["base_size"],
        "resize_size": args["resize_size"],
        "resize_mode": args["resize_mode"],
        "antialias": args["antialias"],
        "device": device,
        "gram_dtype": args["gram_dtype"],
        "kernel": args["kernel"],
        "sigma_frac": args["sigma_frac"],
        "bandwidth": args["bandwidth"],
        "weighting": args["weighting"],
        "batch_size": args["batch_size"],
        "repeats": args["repeats"],
        "num_images": args["num_images"],
        "seed": args["seed"],
        "num_workers": args["workers"],
        "progress": True,  # a bar on a terminal, a line every few seconds elsewhere
        "rank": rank,
        "world_size": world,
    }
    if not two_models:
        return compare_scales(model_a, args["data"], args["scales"], settings=settings, **common)
    model_b = resolve_model(
        args["model_b"],
        args["weights_b"],
        args["checkpoint_b"],
        args["num_classes"],
        args["seed"],
        suffix="-b",
    )
    settings.update(
        model_b=model_label(args["model_b"], args["checkpoint_b"]),
        weights_b=args["weights_b"],
        checkpoint_b=str(args["checkpoint_b"]) if args["checkpoint_b"] else None,
    )
    layers_b = parse_layers(args["layers_b"]) if args["layers_b"] else None
    return compare_models(
        model_a,
        model_b,
        args["data"],
        scale=args["scale"],
        layers_b=layers_b,
        settings=settings,
        **common,
    )


def _report(result: CKAResult, out: Path) -> None:
    console = make_console()
    console.print(summary_table(result))
    s = result.settings
    console.print(
        f"{s['images_used'] // result.repeats} images x {result.repeats} sweep(s), {result.elapsed:.1f} s"
        + (f", {s['images_skipped']} unreadable image(s) skipped" if s["images_skipped"] else "")
    )
    console.print(f"result written to {out}/:")
    for name in sorted(p.name for p in out.iterdir()):
        console.print(f"  {out / name}")


@main.command(name="models", context_settings=CONTEXT)
def models_command() -> None:
    """List the torchvision model names --model accepts."""
    from ckascope.models import list_models

    click.echo("\n".join(list_models()))


def _candidates(result: CKAResult, split_points: str | None) -> list[SplitCandidate]:
    """The vocabulary: given on the command line, or msun's for the analysed architecture."""
    if split_points:
        return [SplitCandidate(p.strip()) for p in split_points.split(",") if p.strip()]
    if result.settings.get("paths"):
        raise InputError(
            "this result is of a multi-path (MSUN) model, which is already split. Hint: analyse the vanilla model"
        )
    arch = str(result.settings.get("model"))
    return list(plugins.load("split_candidates")(arch))


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
@click.option("--split-points", help="Comma-separated legal split points [msun's for the model].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@_options
def suggest_split_command(
    from_dir: Path | None, threshold: float, split_points: str | None, as_json: bool, **args: Any
) -> None:
    """Where to split a backbone into per-scale subnets and a shared trunk (for msun train).

    The first legal split point whose trunk input has same-layer cross-scale CKA >= threshold:
    the scale-sensitive layers before it become per-scale subnets. The printed value is what
    msun train --split-at takes.

    \b
    Examples:
      ckascope suggest-split --from ckascope-out/resnet50_32-224
      ckascope suggest-split --model resnet50 --scales 32 224 --data ~/imagenet/val
    """
    if from_dir is not None:
        result, is_main = CKAResult.load(from_dir), True
    else:
        two_models = _check_sides(args)
        if args["out"] is not None:
            check_output_dir(args["out"], args["overwrite"])
        result, is_main = _analyse(args, two_models)
        if is_main and args["out"] is not None:
            _save(result, args["out"], args)
    if not is_main:
        return
    suggestion = suggest_split(result, _candidates(result, split_points), threshold=threshold)
    if as_json:
        click.echo(json.dumps(suggestion.to_dict(), indent=2))
        return
    console = make_console()
    console.print(split_table(suggestion))
    console.print(f"--split-at {suggestion.choice}: {suggestion.reason}")
