"""The ``ckascope`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ckascope import __version__
from ckascope.cliutils import FriendlyGroup, config_options, explicit_options
from ckascope.config import CompareConfig
from ckascope.vocab import DEFAULT_THRESHOLD

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=FriendlyGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ckascope")
def main() -> None:
    """See how every layer of a CNN reacts when the same images arrive at another scale."""


@main.command(context_settings=CONTEXT)
@config_options(CompareConfig)
def compare(**args: Any) -> None:
    """Layer-by-layer CKA of one model at two input scales, or of two models.

    \b
    Examples:
      ckascope compare --model resnet18 --weights none --scales 32 224
      ckascope compare --model resnet50 --data ~/imagenet/val --repeats 10
      ckascope compare --model resnet18 --weights none --data fashionmnist --scales 4 28
      ckascope compare --model resnet18 --model-b resnet34 --weights none --weights-b none
      ckascope compare --checkpoint run/last.pt --scales 32 224  # multi-path: each scale its path
    """
    from ckascope.commands import run_compare

    run_compare(CompareConfig.from_options(args), explicit_options())


@main.command(name="plot", context_settings=CONTEXT)
@click.argument("result_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Folder for the figures (created if missing)  [default: RESULT_DIR itself].",
)
@click.option("--annotate", is_flag=True, help="Print each cell's CKA in the heatmap.")
@click.option(
    "--overwrite", is_flag=True, help="Replace figure files of the same names already there."
)
def plot_command(result_dir: Path, out: Path | None, annotate: bool, overwrite: bool) -> None:
    """Draw a saved result's figures again: heatmap.png/pdf and curve.png/pdf.

    The same figures compare writes, from RESULT_DIR's numbers alone (no model is run): for a
    result saved with --no-figures, or to add --annotate. Only the figure files are written;
    existing ones are kept unless --overwrite.

    \b
    Examples:
      ckascope plot ckascope-out/resnet18_32-224
      ckascope plot ckascope-out/resnet18_32-224 --out slides/cka --annotate
    """
    from ckascope.commands import run_plot

    run_plot(result_dir, out, annotate, overwrite)


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
    help="A saved compare result folder (otherwise run one with the options below; they do not "
    "apply to a saved one).",
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
@config_options(CompareConfig)
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

    cfg = CompareConfig.from_options(args)
    explicit = explicit_options() & set(args)  # the comparison's options the user gave
    run_suggest_split(from_dir, threshold, split_points, as_json, cfg, explicit)
