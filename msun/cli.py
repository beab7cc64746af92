"""The ``msun`` command line."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ckascope.platform import (
    FriendlyGroup,
    config_options,
    explicit_options,
    launched_rank,
    make_console,
    renamed_flags,
)
from msun import __version__
from msun.config import (
    TrainConfig,
    check,
    merge,
    nominal_scales,
    paper_sizes,
    parse_sizes,
    read_options,
    run_options,
    sizes_text,
    without_split_record,
)
from msun.options import EvalConfig, FlopsConfig, check_eval

if TYPE_CHECKING:
    from rich.table import Table

    from msun.evaluate import Evaluated

# torch and everything built on it are imported inside the commands, so that --help, a usage
# error or a typo answers at once instead of after seconds of imports.

_INTEGER = re.compile(r"-?\d+")


def _join_lists(
    args: Sequence[str], names: Sequence[str], integers_only: bool = False
) -> list[str]:
    """Turns ``--scales 32 128 224`` into ``--scales 32,128,224`` so click sees one value.

    Tokens after a list option are joined until the next option (a negative integer still
    counts as a value, so that the scale check can name the problem); with ``integers_only``
    (a command that also takes arguments, such as checkpoints) until the first token that is
    not an integer or a comma-separated list of them.
    """
    out: list[str] = []
    tokens = list(args)
    while tokens:
        token = tokens.pop(0)
        out.append(token)
        if token not in names:
            continue
        values = []
        while tokens and _is_value(tokens[0], integers_only):
            values.append(tokens.pop(0))
        if values:
            out.append(",".join(values))
    return out


def _is_value(token: str, integers_only: bool) -> bool:
    """Whether ``token`` continues a list option's values (see ``_join_lists``)."""
    if integers_only:
        return all(_INTEGER.fullmatch(part) for part in token.split(","))
    return not token.startswith("-") or bool(_INTEGER.fullmatch(token))


#: Flags renamed so one idea has one name; the old ones still work for one release.
RENAMED = {"--sizes": "--eval-sizes"}  # the test sizes, as msun train has always called them


class ListOptionCommand(click.Command):
    """A command whose ``list_options`` take one or more space- or comma-separated values
    (and whose renamed flags still take their old names)."""

    list_options: tuple[str, ...] = ("--scales", "--eval-sizes")
    integers_only = False  # True where arguments may follow a list (see ``_join_lists``)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = renamed_flags(args, RENAMED)
        return super().parse_args(ctx, _join_lists(args, self.list_options, self.integers_only))


class EvalCommand(ListOptionCommand):
    """``msun eval``: ``--eval-sizes 4 16 28`` as in train, with checkpoints around it."""

    list_options = ("--eval-sizes",)
    integers_only = True


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """Parses a comma-separated list of integers, e.g. ``32,128,224`` (none given: empty)."""
    try:
        return tuple(int(v) for v in (value or "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of integers, e.g. 32 128 224") from None


#: ``--scales 32 128 224``: one value for click (``ListOptionCommand`` joins the tokens).
_SCALES_OPTION = {
    "default": None,  # derived from --image-size (TrainConfig, msun flops)
    "callback": _int_list,
    "metavar": "S [S ...]",
}

#: The word that unsets, on the command line, an option a --config file set (YAML's own null
#: stays the way to leave one unset in a file).
UNSET = "none"


def _text_or_unset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A text option's value; ``none`` unsets it (None)."""
    return None if value == UNSET else value


def _number_or_unset(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A number option's value; ``none`` unsets it (None)."""
    if value is None or value == UNSET:
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (or {UNSET})") from None


#: msun train's options that ``none`` unsets: the MSUN-only ones a run's config.yaml records,
#: so that the file can train a baseline (``msun.config.check`` names them).
_UNSETTABLE: dict[str, dict[str, Any]] = {
    "split_at": {"callback": _text_or_unset},
    "cka_from": {"callback": _text_or_unset},
    "si_threshold": {"type": str, "callback": _number_or_unset, "metavar": "FLOAT|none"},
}


@click.group(cls=FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msun")
def main() -> None:
    """Multi-scale Unified Network: build, train, evaluate and count FLOPs."""


@main.command(cls=ListOptionCommand)
@config_options(FlopsConfig, overrides={"scales": _SCALES_OPTION})
def flops(**values: Any) -> None:
    """FLOPs over the test sizes under both protocols, against vanilla at the image size.

    upsample: each input is resized to its routed path's nominal size; native: the routed path
    runs at the input's own size (the paper's FLOPs claim). Counted with
    torch.utils.flop_counter on the meta device (convolutions and matrix products only).
    """
    import torch

    from msun.flops import flops_report, flops_table, parameters_table
    from msun.model import build_msun

    cfg = FlopsConfig(**values)
    size = cfg.image_size or max(cfg.scales, default=224)
    scales = cfg.scales or nominal_scales(size)
    tested = parse_sizes(cfg.eval_sizes) if cfg.eval_sizes else paper_sizes(size)
    _check_flops_sizes(cfg, size, scales)
    with torch.device("meta"):  # structure only: counting needs no weights
        model = build_msun(
            cfg.model, split_at=cfg.split_at, scales=scales, num_classes=cfg.num_classes, bn=cfg.bn
        )
    if cfg.image_size and cfg.scales and cfg.image_size != scales[-1]:
        click.echo(
            f"note: vanilla runs at --image-size {size} and the MSUN's largest path at "
            f"{scales[-1]} (the largest of --scales), so the saving compares inputs of different "
            "sizes; msun train's default --scales end at its --image-size",
            err=True,
        )
    report = flops_report(model.eval(), tested, size)
    if cfg.json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    console = make_console()
    console.print(flops_table(report))
    console.print(parameters_table(report))


def _check_flops_sizes(cfg: FlopsConfig, size: int, scales: tuple[int, ...]) -> None:
    """Refuses sizes the network shrinks to nothing: vanilla at ``size``, the largest path.

    An MSUN's largest path is the vanilla network at the largest scale; its subnets are
    checked as it is built, the test sizes (native protocol) as they are counted.
    """
    from msun.config import check_side
    from msun.model import check_scales

    largest = check_scales(scales)[-1]
    if cfg.image_size or not cfg.scales:  # the image size: given, or the default's
        check_side(cfg.model, size, f"vanilla runs at --image-size {size}", "--image-size")
    listed = " ".join(map(str, scales))
    runs = f"the MSUN's largest path and vanilla run at the largest of --scales {listed}"
    if cfg.image_size:
        runs = f"the MSUN's largest path runs at the largest of --scales {listed}"
    check_side(cfg.model, largest, runs, "the largest of --scales")


@main.command(name="split-points")
@click.argument("arch")
def split_points_command(arch: str) -> None:
    """List the legal --split-at values of ARCH, in forward order."""
    from msun.backbones import split_points

    click.echo("\n".join(split_points(arch)))


@main.command(cls=ListOptionCommand, context_settings={"max_content_width": 110})
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    help="YAML file of options (flags win).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last.pt, with its own options (config.yaml).",
)
@config_options(TrainConfig, overrides={"scales": _SCALES_OPTION, **_UNSETTABLE})
def train(config_file: Path | None, resume: bool, **values: Any) -> None:
    """Train MSUN, MST or vanilla with the published recipe (one CPU, one GPU, or torchrun).

    \b
    Examples:
      msun train --model resnet50 --method msun --split-at layer2 --data ~/imagenet --out runs/r50
      msun train --model resnet18 --data shapes --image-size 96 --scales 16 48 96 --epochs 8
      torchrun --nproc_per_node 8 -m msun train --config recipe.yaml
    """
    explicit = explicit_options()
    given = {k: v for k, v in values.items() if k in explicit}
    # a run's own config.yaml repeats the split it chose, not the analysis it chose it from
    from_file = without_split_record(read_options(config_file), given) if config_file else {}
    cfg = merge(from_file, given)
    files = {k: str(config_file) for k in from_file}
    if resume:  # what was not given is the run's own (config.yaml), not today's defaults
        run = run_options(Path(cfg.out), {**from_file, **given})
        cfg = merge(run, from_file, given)
        files = {**dict.fromkeys(run, str(Path(cfg.out) / "config.yaml")), **files}
    check(cfg, {k: source for k, source in files.items() if k not in given}, resume=resume)
    from ckascope.platform import close_distributed
    from msun.train import main as train_main

    try:
        out = train_main(cfg, resume=resume, explicit={*from_file, *given})
    finally:
        close_distributed()
    make_console(quiet=launched_rank()[0] != 0).print(  # one folder for the job: said once
        f"run folder: {out} ({_run_contents(out)})"
    )


#: What a run folder may hold, in the order its last line names them.
RUN_CONTENTS = (
    "last.pt",
    "best.pt",
    "metrics.csv",
    "metrics.jsonl",
    "config.yaml",
    "split-analysis/",
    "tensorboard/",
)


def _run_contents(out: Path) -> str:
    """The files and folders of a run that its folder holds (TensorBoard's with --tensorboard)."""
    return ", ".join(name for name in RUN_CONTENTS if (out / name.rstrip("/")).exists())


@main.command(name="eval", cls=EvalCommand, context_settings={"max_content_width": 110})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@config_options(EvalConfig)
def eval_command(checkpoints: tuple[Path, ...], **values: Any) -> None:
    """Top-1/top-5 over test sizes for every CHECKPOINT; the paper's Figure 4.

    MSUN checkpoints are routed by their fixed routing table (never the best path per size on
    this set); vanilla and MST checkpoints see each test image resized back to their training
    size. The per-path table shows what each MSUN path would score.
    """
    from torch.utils.data import DataLoader

    from ckascope.platform import (
        check_output_dir,
        close_distributed,
        collate_skip,
        dataset_len,
        init_distributed,
        next_free,
        plan_batches,
        subset_indices,
    )
    from msun.data import check_num_val, validation_seed
    from msun.evaluate import (
        EVAL_OUTPUT,
        check_classes,
        check_recalibratable,
        check_runnable,
        check_same_setting,
        eval_dataset,
        evaluate_checkpoints,
        load_for_eval,
        note_repeated,
        note_synthetic,
        recalibration_set,
        scored_in_place,
        unique_labels,
    )

    cfg = EvalConfig(**values)
    check_eval(cfg)  # bad flags are refused before any checkpoint is read
    if cfg.eval_sizes:
        parse_sizes(cfg.eval_sizes)
    out = cfg.out or next_free(Path("msun-eval"))
    check_output_dir(out, cfg.overwrite, EVAL_OUTPUT)  # before any checkpoint is read
    names = unique_labels(checkpoints)
    loaded = [load_for_eval(p, n) for p, n in zip(checkpoints, names, strict=True)]
    check_same_setting(loaded, cfg.data, cfg.image_size)
    if cfg.recalibrate_bn:
        check_recalibratable(loaded)
    image_size = cfg.image_size or loaded[0].image_size
    sizes = parse_sizes(
        cfg.eval_sizes or loaded[0].eval_sizes or sizes_text(paper_sizes(image_size))
    )
    check_runnable(loaded, sizes, cfg.protocol, cfg.paths)  # before the data is read
    info = init_distributed(cfg.device)
    data = cfg.data or loaded[0].data
    # the synthetic set: the pool the run's validation drew
    dataset = eval_dataset(
        data, image_size, cfg.num_val or 2000, loaded[0].seed, recorded=cfg.data is None
    )
    count = dataset_len(dataset)
    check_num_val(cfg.num_val, count, data)
    check_classes(loaded, dataset, data)
    in_place = scored_in_place(dataset, data)
    if in_place is not None and info.is_main:
        make_console().print(
            f"note: {in_place} has no val/ folder: scoring the images of its own class sub-folders"
        )
    recalibration = (
        recalibration_set(
            data,
            image_size,
            cfg.recalibrate_bn,
            cfg.batch_size,
            loaded[0].seed,
            synthetic_train=loaded[0].synthetic_train,
        )
        if cfg.recalibrate_bn
        else None
    )
    # after the last refusal: a refused call prints one line
    note_repeated(checkpoints, names)
    note_synthetic(loaded, data)
    # the images the (first) run's own validation scored: the same draw as msun.data's
    keep = subset_indices(count, cfg.num_val, validation_seed(loaded[0].seed))
    batches = plan_batches(keep, cfg.batch_size, info.rank, info.world_size, deal="images")
    loader = DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate_skip, num_workers=cfg.workers
    )
    try:
        evaluated = evaluate_checkpoints(
            loaded,
            loader,
            sizes,
            protocol=cfg.protocol,
            paths=cfg.paths,
            device=info.device,
            memory_format=cfg.memory_format,
            recalibration=recalibration,
            progress=info.is_main,
            data=data,
            image_size=image_size,
            test_draw_seed=loaded[0].seed,
            sizes_checked=True,  # above, before the data was read
        )
    finally:
        close_distributed()
    if info.is_main:
        _write_eval(evaluated, out, cfg.protocol)


def path_table(ev: Evaluated) -> Table:
    """Top-1 of every MSUN path at every size; the routed path's cell is starred."""
    import numpy as np
    from rich.table import Table

    r = ev.result
    table = Table(title=f"{ev.name}: top-1 (%) per path, * routed")
    table.add_column("size", justify="right")
    for k in range(r.top1.shape[1]):
        table.add_column(f"path {k}", justify="right")
    for i, size in enumerate(r.sizes):
        cells = [
            "-" if np.isnan(v) else f"{v:.2f}" + ("*" if k == r.routed[i] else "")
            for k, v in enumerate(r.top1[i])
        ]
        table.add_row(str(size), *cells)
    return table


def _write_eval(evaluated: list[Evaluated], out: Path, asked: str) -> None:
    """eval.csv, eval.json and Figure 4 in ``out``, then the tables and what ``asked`` missed.

    The protocol is named in the title only where every column ran under it; otherwise each
    column names its own.
    """
    from rich.table import Table

    from ckascope.platform import atomic_write, staged_folder, write_json
    from msun.evaluate import EVAL_OUTPUT, shared_protocol
    from msun.evaluate import frame as eval_frame
    from msun.plot import save_accuracy_figure

    # --out was checked before the work; only an earlier eval output is ever replaced
    with staged_folder(out, overwrite=True, kind=EVAL_OUTPUT) as staging:
        atomic_write(staging / "eval.csv", lambda f: eval_frame(evaluated).to_csv(f, index=False))
        write_json(staging / "eval.json", [ev.summary() for ev in evaluated])
        save_accuracy_figure(evaluated, staging)
    shared = shared_protocol(ev.result.protocol for ev in evaluated)
    heading = f"{shared} protocol" if shared else "protocol per column"
    table = Table(title=f"top-1 (%) per test size, {heading}")
    table.add_column("size", justify="right")
    for ev in evaluated:
        protocol = "" if shared else f"\n{ev.result.protocol} protocol"
        table.add_column(f"{ev.name}\n({ev.variant}){protocol}", justify="right")
    for i, size in enumerate(evaluated[0].result.sizes):
        table.add_row(str(size), *(f"{ev.result.routed_top1[i]:.2f}" for ev in evaluated))
    table.add_row("mean", *(f"{ev.result.mean_top1:.2f}" for ev in evaluated), style="bold")
    table.add_row("GFLOPs", *(f"{ev.mean_flops / 1e9:.3f}" for ev in evaluated))
    table.add_row("params (M)", *(f"{ev.parameters / 1e6:.3f}" for ev in evaluated))
    console = make_console()
    console.print(table)
    for ev in evaluated:
        if ev.result.top1.shape[1] > 1:
            console.print(path_table(ev))
    missed = [ev.name for ev in evaluated if ev.result.protocol != asked]
    if missed:  # --protocol native reaches MSUN paths only
        console.print(
            f"note: --protocol {asked} applies to MSUN paths; {', '.join(missed)} saw each test "
            "image at its training size (upsample), as recorded"
        )
    console.print(
        f"wrote {out / 'eval.csv'}, {out / 'eval.json'}, {out / 'figure4.png'}, {out / 'figure4.pdf'}"
    )


if __name__ == "__main__":  # torchrun --nproc_per_node N -m msun.cli train ...
    main()
