"""The ``msun`` command line."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import click
import torch
from rich.console import Console

from ckascope.cliutils import FriendlyGroup
from msun import __version__
from msun.flops import flops_report, flops_table, parameters_table
from msun.model import build_msun

_INTEGER = re.compile(r"-?\d+")


def _join_lists(args: Sequence[str], names: Sequence[str]) -> list[str]:
    """Turns ``--scales 32 128 224`` into ``--scales 32,128,224`` so click sees one value.

    Tokens after a list option are joined until the next option (a negative integer still
    counts as a value, so that the scale check can name the problem).
    """
    out: list[str] = []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        out.append(token)
        if token not in names:
            continue
        values = []
        while tokens and (not tokens[0].startswith("-") or _INTEGER.fullmatch(tokens[0])):
            values.append(tokens.pop(0))
        if values:
            out.append(",".join(values))
    return out


class ListOptionCommand(click.Command):
    """A command whose ``list_options`` take one or more space- or comma-separated values."""

    list_options: tuple[str, ...] = ("--scales",)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _join_lists(args, self.list_options))


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """Parses a comma-separated list of integers, e.g. ``32,128,224``."""
    try:
        return tuple(int(v) for v in value.split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of integers, e.g. 32 128 224") from None


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msun")
def main() -> None:
    """Multi-scale Unified Network: build, train, evaluate and count FLOPs."""


@main.command(cls=ListOptionCommand)
@click.option("--model", "arch", required=True, help="Backbone, e.g. resnet50.")
@click.option("--split-at", default=None, help="First stage of the shared trunk [published].")
@click.option(
    "--scales", default="32,128,224", metavar="S [S ...]", callback=_int_list,
    help="Nominal input size of each subnet, ascending.  [default: 32 128 224]",
)  # fmt: skip
@click.option("--num-classes", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout instead of tables.")
def flops(
    arch: str, split_at: str | None, scales: tuple[int, ...], num_classes: int, as_json: bool
) -> None:
    """FLOPs over the 13 test sizes 32..224 under both protocols, against vanilla at 224.

    accuracy: each input is resized to its routed path's nominal size; native: the routed path
    runs at the input's own size (the paper's FLOPs claim). Counted with
    torch.utils.flop_counter on the meta device (convolutions and matrix products only).
    """
    with torch.device("meta"):  # structure only: counting needs no weights
        model = build_msun(arch, split_at=split_at, scales=scales, num_classes=num_classes)
    report = flops_report(model.eval())
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    console = Console()
    console.print(flops_table(report))
    console.print(parameters_table(report))


if __name__ == "__main__":  # torchrun --nproc_per_node N -m msun.cli train ...
    main()
