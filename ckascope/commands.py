"""What the ``ckascope`` commands do, once their options are parsed.

``ckascope.cli`` defines the options and imports this module only when a command runs, so that
``--help`` and usage errors answer without importing torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table
from torch import nn

from ckascope import plugins
from ckascope.cliutils import make_console
from ckascope.compare import compare_models, compare_scales, default_scales, image_size_for
from ckascope.distributed import close_distributed, init_distributed
from ckascope.errors import InputError
from ckascope.models import (
    build_model,
    checkpoint_label,
    is_self_describing,
    model_from_checkpoint,
    read_checkpoint,
    weights_input_size,
)
from ckascope.plot import save_figures
from ckascope.result import CKAResult, check_output_dir, next_free
from ckascope.split import SplitCandidate, split_table, suggest_split


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
) -> tuple[nn.Module, str | None]:
    """The model a set of --model/--weights/--checkpoint options names, and its architecture.

    The architecture is --model's, else the one a self-describing checkpoint records (None if
    it records none). ``suffix`` "-b" names the second model's options (--weights-b ...) in the
    hints.
    """
    if checkpoint is not None:
        ckpt = read_checkpoint(checkpoint)
        model = model_from_checkpoint(ckpt, checkpoint, name)
        config = (ckpt.get("config") or {}) if is_self_describing(ckpt) else {}
        return model, name or config.get("arch")
    if name is None:
        raise InputError(
            "no model given. Hint: pass --model NAME (e.g. resnet50) or --checkpoint FILE"
        )
    return build_model(name, weights, num_classes=num_classes, seed=seed, suffix=suffix), name


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


def run_compare(args: dict[str, Any]) -> None:
    """``ckascope compare`` with its parsed options."""
    two_models = check_sides(args)
    out = args["out"] or next_free(default_out(args))  # a default never replaces a result
    check_output_dir(out, args["overwrite"])
    try:
        result, is_main = analyse(args, two_models)
    finally:
        close_distributed()
    if is_main:
        save(result, out, args)
        report(result, out)


def run_suggest_split(
    from_dir: Path | None,
    threshold: float,
    split_points: str | None,
    as_json: bool,
    args: dict[str, Any],
) -> None:
    """``ckascope suggest-split`` with its parsed options."""
    if from_dir is not None:
        result, is_main = CKAResult.load(from_dir), True
    else:
        two_models = check_sides(args)
        if args["out"] is not None:
            check_output_dir(args["out"], args["overwrite"])
        try:
            result, is_main = analyse(args, two_models)
        finally:
            close_distributed()
        if is_main and args["out"] is not None:
            save(result, args["out"], args)
    if not is_main:
        return
    suggestion = suggest_split(result, candidates(result, split_points), threshold=threshold)
    if as_json:
        click.echo(json.dumps(suggestion.to_dict(), indent=2))
        return
    console = make_console()
    console.print(split_table(suggestion))
    console.print(f"--split-at {suggestion.choice}: {suggestion.reason}")


def check_sides(args: dict[str, Any]) -> bool:
    """Whether two models are compared; fills in the default scales of one model."""
    two_models = bool(args["model_b"] or args["checkpoint_b"])
    if two_models and args["scales"]:
        raise InputError("--scales compares two scales of one model; with --model-b use --scale S")
    # The size pretrained weights expect (299 for inception_v3) comes before the data's own.
    expected = (
        weights_input_size(args["model"], args["weights"]) if not args["checkpoint"] else None
    ) or (
        weights_input_size(args["model_b"], args["weights_b"]) if not args["checkpoint_b"] else None
    )
    args["image_size"] = image_size_for(args["data"], args["image_size"] or expected)
    args["scales"] = tuple(args["scales"] or default_scales(args["image_size"]))
    args["scale"] = args["scale"] or args["image_size"]
    return two_models


def analyse(args: dict[str, Any], two_models: bool) -> tuple[CKAResult, bool]:
    """Runs the comparison the options describe (under torchrun: this process's share)."""
    dist = init_distributed(args["device"])
    return run(args, two_models, dist.rank, dist.world_size, dist.device), dist.is_main


def save(result: CKAResult, out: Path, args: dict[str, Any]) -> None:
    """Writes the result (and its figures unless --no-figures) to ``out``."""
    result.save(
        out, overwrite=args["overwrite"], extra=None if args["no_figures"] else figures(result)
    )


def figures(result: CKAResult) -> Callable[[Path], None]:
    """A writer of the result's figures into a folder."""

    def write(folder: Path) -> None:
        save_figures(result, folder)

    return write


def run(args: dict[str, Any], two_models: bool, rank: int, world: int, device: Any) -> CKAResult:
    """This process's comparison as the options describe it."""
    model_a, arch_a = resolve_model(
        args["model"], args["weights"], args["checkpoint"], args["num_classes"], args["seed"]
    )
    settings = {
        "model": model_label(args["model"], args["checkpoint"]),
        "arch": arch_a,
        "weights": args["weights"],
        "checkpoint": str(args["checkpoint"]) if args["checkpoint"] else None,
        "data": args["data"] or "shapes",
    }
    common = {
        "layers": parse_layers(args["layers"]),
        "protocol": args["protocol"],
        "image_size": args["image_size"],
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
        "tf32": args["tf32"],
        "progress": True,  # a bar on a terminal, a line every few seconds elsewhere
        "rank": rank,
        "world_size": world,
    }
    if not two_models:
        return compare_scales(model_a, args["data"], args["scales"], settings=settings, **common)
    model_b, arch_b = resolve_model(
        args["model_b"],
        args["weights_b"],
        args["checkpoint_b"],
        args["num_classes"],
        args["seed"],
        suffix="-b",
    )
    settings.update(
        model_b=model_label(args["model_b"], args["checkpoint_b"]),
        arch_b=arch_b,
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


def report(result: CKAResult, out: Path) -> None:
    """The summary table, the sweep's size and time, and the files written."""
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


def candidates(result: CKAResult, split_points: str | None) -> list[SplitCandidate]:
    """The vocabulary: given on the command line, or a registered family's for the architecture."""
    if split_points:
        return [SplitCandidate(p.strip()) for p in split_points.split(",") if p.strip()]
    if result.settings.get("paths"):
        raise InputError(
            "this result is of a multi-path model, which is already split. Hint: analyse the "
            "single-path (vanilla) model"
        )
    if result.arch is None:
        raise InputError("this result records no architecture. Hint: pass --split-points")
    return split_vocabulary(result.arch)


def split_vocabulary(arch: str) -> list[SplitCandidate]:
    """The split points of ``arch`` from the first registered family that knows it."""
    families = plugins.list_entries("split_vocabularies")
    for family in families:
        candidates = plugins.load("split_vocabularies", family)(arch)
        if candidates is not None:
            return list(candidates)
    raise InputError(
        f"no registered model family knows the split points of {arch!r} (families: "
        f"{', '.join(families) or 'none'}). Hint: pass --split-points"
    )
