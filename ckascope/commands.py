"""What the ``ckascope`` commands do, once their options are parsed.

``ckascope.cli`` defines the options and imports this module only when a command runs, so that
``--help`` and usage errors answer without importing torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table
from torch import nn

from ckascope import config, plugins
from ckascope.calibration import coarse_bootstrap_note, coarse_null_note
from ckascope.cliutils import launched_rank, make_console
from ckascope.compare import SideSpec, SweepOptions, compare_sides, image_size_for
from ckascope.config import CompareConfig
from ckascope.data import is_synthetic
from ckascope.distributed import close_distributed, init_distributed
from ckascope.errors import InputError
from ckascope.models import (
    build_model,
    checkpoint_label,
    is_self_describing,
    model_from_checkpoint,
    read_checkpoint,
    read_inputs,
    weights_input_size,
)
from ckascope.multipath import is_multipath
from ckascope.options import (
    SweepFields,
    ViewFields,
    changed_fields,
    flag_of,
    refuse_ignored,
    values_of,
)
from ckascope.plot import redraw, save_figures
from ckascope.result import CKAResult, check_output_dir, is_result_dir, next_free
from ckascope.split import (
    LOW_CKA_HINT,
    SplitCandidate,
    check_analysed,
    in_forward_order,
    load_analysis,
    position,
    split_table,
    suggest_split,
    unanalysed,
)
from ckascope.views import ViewOptions


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


def default_out(cfg: CompareConfig) -> Path:
    """ckascope-out/<model>_<a>-<b> or ckascope-out/<a>_vs_<b>_<scale> (of a resolved config)."""
    a = model_label(cfg.model, cfg.checkpoint)
    if cfg.two_models:
        b = model_label(cfg.model_b, cfg.checkpoint_b)
        return Path("ckascope-out") / f"{a}_vs_{b}_{cfg.scale}"
    s_a, s_b = cfg.side_scales
    return Path("ckascope-out") / f"{a}_{s_a}-{s_b}"


def summary_table(result: CKAResult) -> Table:
    """Same-layer CKA per layer, or for two models each row's best-matching column.

    A calibrated result adds each value's bootstrap interval, its chance level (the
    permutation null's mean) and p-value.
    """
    table = Table(title="Cross-scale CKA" if result.has_diagonal else "Best match per layer")
    if result.has_diagonal:
        spread = result.repeats > 1  # one sweep has no spread to show
        columns = ["layer", "CKA", *(["± std"] if spread else []), *_calibration_columns(result)]
        for column in columns:
            table.add_column(column, justify="left" if column == "layer" else "right")
        for i, row in enumerate(result.diagonal().itertuples()):
            std = [f"{row.std:.4f}"] if spread else []
            table.add_row(
                str(row.layer), f"{row.mean:.4f}", *std, *_calibration_cells(result, i, i)
            )
        return table
    for column in ("layer a", "best layer b", "CKA", *_calibration_columns(result)):
        table.add_column(column)
    for i, name in enumerate(result.layers_a):
        row = np.nan_to_num(result.matrix[i], nan=-np.inf)
        j = int(row.argmax())
        cells = _calibration_cells(result, i, j)
        table.add_row(name, result.layers_b[j], f"{result.matrix[i, j]:.4f}", *cells)
    return table


def _calibration_columns(result: CKAResult) -> list[str]:
    level = f"{100 * float(result.settings.get('ci') or 0.95):g} % interval"
    return [
        *([level] if "ci_low" in result.calibration else []),
        *(["chance", "p"] if "p_value" in result.calibration else []),
    ]


def _calibration_cells(result: CKAResult, i: int, j: int) -> list[str]:
    cells = []
    low, high = result.cell("ci_low"), result.cell("ci_high")
    if low is not None and high is not None:
        cells.append(f"{low[i, j]:.4f} .. {high[i, j]:.4f}")
    null, p_value = result.cell("null_mean"), result.cell("p_value")
    if null is not None and p_value is not None:
        cells += [f"{null[i, j]:.4f}", f"{p_value[i, j]:.3f}"]
    return cells


def run_compare(cfg: CompareConfig, explicit: Collection[str] | None = None) -> None:
    """``ckascope compare`` with its parsed options and the names of those the user gave.

    ``explicit`` (None: the options that differ from their defaults) lets an option given
    where it does nothing be refused before any model is built (``config.check_applies``).
    """
    config.check_applies(cfg, explicit)
    check_sweep(cfg)
    cfg = resolve_config(cfg)
    out = cfg.out or next_free(default_out(cfg))  # a default never replaces a result
    check_output_dir(out, cfg.overwrite)
    try:
        result, is_main = analyse(cfg)
    finally:
        close_distributed()
    if is_main:
        save(result, out, cfg)
        report(result, out)


def run_suggest_split(
    from_dir: Path | None,
    threshold: float,
    split_points: str | None,
    as_json: bool,
    cfg: CompareConfig,
    explicit: Collection[str] | None = None,
) -> None:
    """``ckascope suggest-split`` with its parsed options.

    ``explicit`` names the comparison's options the user gave (None: those that differ from
    their defaults): with a saved result (``--from``) they would set up a comparison that is
    not run, so they are refused; otherwise they are checked as ``compare`` checks them.
    """
    if explicit is None:
        explicit = changed_fields(cfg)
    if from_dir is not None:
        refuse_compare_flags(from_dir, [flag_of(cfg, n) for n in config.FIELDS if n in explicit])
        result = load_analysis(from_dir, "--from", direct="ckascope suggest-split")
        is_main = True
    else:
        config.check_applies(cfg, explicit)
        refuse_ignored(cfg, config.SUGGEST_USES, explicit)
        check_sweep(cfg)
        cfg = resolve_config(cfg)
        check_split_request(cfg, split_points)  # before the comparison, not after it
        result, is_main = _analyse_and_save(cfg)
    if not is_main:
        return
    points, hint = candidates(result, split_points), low_cka_hint(result)
    suggestion = suggest_split(result, points, threshold=threshold, hint=hint)
    if as_json:
        click.echo(json.dumps(suggestion.to_dict(), indent=2))
        return
    console = make_console()
    console.print(split_table(suggestion))
    for line in suggestion.lines():
        console.print(line, soft_wrap=True)  # one line each: a terminal wraps it


def _analyse_and_save(cfg: CompareConfig) -> tuple[CKAResult, bool]:
    """suggest-split's own comparison, saved where ``--out`` says; whether this is rank 0."""
    if cfg.out is not None:
        check_output_dir(cfg.out, cfg.overwrite)
    try:
        result, is_main = analyse(cfg)
    finally:
        close_distributed()
    if is_main and cfg.out is not None:
        save(result, cfg.out, cfg)
    return result, is_main


def check_split_request(cfg: CompareConfig, split_points: str | None) -> None:
    """Refuses, before any comparison runs, what ``candidates`` would refuse after it.

    Args:
        cfg: The resolved options (``resolve_config``: the scales decided).
        split_points: ``--split-points``, None when not given.

    Raises:
        InputError: Two models (no same-layer diagonal to read), a ``--model`` no family knows
            without ``split_points``, or ``split_points`` empty, repeated, or not split points
            of ``--model``'s family.
    """
    if cfg.two_models:
        raise InputError(
            "suggest-split reads same-layer CKA across two scales of one model, and --model-b / "
            "--checkpoint-b compare two models. Hint: drop the second model, and give --scales"
        )
    scales = (min(cfg.scales or (32, 224)), max(cfg.scales or (32, 224)))  # as the result's
    arch = _checked_checkpoint(cfg, split_points) if cfg.checkpoint else cfg.model
    if split_points is None:
        if arch is None:
            raise InputError(f"{cfg.checkpoint} records no architecture. Hint: pass --split-points")
        split_vocabulary(arch, scales)  # refuses a model no family knows
        return
    given = _given_points(split_points)
    known = _family_vocabulary(arch, scales) if arch else None
    if known is not None:
        _refuse_unknown(arch, known, given)


def _checked_checkpoint(cfg: CompareConfig, split_points: str | None) -> str | None:
    """The architecture of ``--checkpoint`` (read now: a few seconds, not a comparison).

    Raises:
        InputError: A multi-path checkpoint without ``split_points``, or one that cannot be read.
    """
    assert cfg.checkpoint is not None
    model, arch = resolve_model(cfg.model, cfg.weights, cfg.checkpoint, cfg.num_classes, cfg.seed)
    if split_points is None and is_multipath(model):
        raise InputError(f"{cfg.checkpoint} holds {MULTIPATH_REFUSAL}")
    return arch


def refuse_compare_flags(from_dir: Path, flags: Sequence[str]) -> None:
    """Refuses options of a new comparison next to ``--from`` (a saved one), naming them.

    Raises:
        InputError: ``flags`` is not empty.
    """
    if not flags:
        return
    them = "it" if len(flags) == 1 else "them"
    raise InputError(
        f"{', '.join(flags)} {'sets' if len(flags) == 1 else 'set'} up a new comparison and "
        f"{'does' if len(flags) == 1 else 'do'} not apply to a saved result (--from "
        f"{from_dir}). Hint: drop {them}, or leave out --from to run the comparison with {them}"
    )


def resolve_config(cfg: CompareConfig) -> CompareConfig:
    """The config with the image size and the scales decided.

    The image size is --image-size, else the size pretrained weights expect (299 for
    inception_v3), else the side a checkpoint's model was fed in training
    (``models.input_side``), else the data's native size, else 224. A
    checkpoint's smallest and largest training scales are the default --scales when its image
    size is used.
    """
    config.check_applies(cfg)  # options that differ from their defaults (--scales with --model-b)
    expected = (weights_input_size(cfg.model, cfg.weights) if not cfg.checkpoint else None) or (
        weights_input_size(cfg.model_b, cfg.weights_b) if not cfg.checkpoint_b else None
    )
    trained = _trained_on(cfg)
    if cfg.image_size is None and cfg.scales is None and {"scales", "image_size"} <= set(trained):
        cfg = dataclasses.replace(cfg, scales=(min(trained["scales"]), max(trained["scales"])))
    # Two models at --scale S see S-px images (the base images cropped at S), not S-px images
    # resized back up to another size.
    chosen = (
        cfg.image_size
        or (cfg.scale if cfg.two_models else None)
        or expected
        or trained.get("input_size")
    )
    resolved = config.resolve(cfg, image_size_for(cfg.data, chosen))
    config.check_scales(resolved)
    return resolved


def _trained_on(cfg: CompareConfig) -> dict[str, Any]:
    """What the one compared checkpoint was trained on (``models.read_inputs``), noting its data.

    A model trained on other images than the ones compared is worth a word when the user chose
    none: the synthetic set is ckascope's default, not the checkpoint's.
    """
    if cfg.two_models or cfg.checkpoint is None:
        return {}
    trained = read_inputs(cfg.checkpoint)
    data = trained.get("data")
    if cfg.data is None and not is_synthetic(data) and _first_process():
        click.echo(
            f"note: {cfg.checkpoint} was trained on {data}; these are the synthetic images. "
            f"Hint: --data {data} analyses it on its own",
            err=True,
        )
    return trained


def _first_process() -> bool:
    """Rank 0 under torchrun (before the process group exists), or the only process."""
    return launched_rank()[0] == 0


def analyse(cfg: CompareConfig) -> tuple[CKAResult, bool]:
    """Runs the comparison the options describe (under torchrun: this process's share)."""
    dist = init_distributed(cfg.device)
    return run(cfg, dist.rank, dist.world_size, dist.device), dist.is_main


def save(result: CKAResult, out: Path, cfg: CompareConfig) -> None:
    """Writes the result (and its figures unless --no-figures) to ``out``."""
    extra = None if cfg.no_figures else figures(result, cfg.annotate)
    result.save(out, overwrite=cfg.overwrite, extra=extra)


def figures(result: CKAResult, annotate: bool = False) -> Callable[[Path], None]:
    """A writer of the result's figures into a folder."""

    def write(folder: Path) -> None:
        save_figures(result, folder, annotate=annotate)

    return write


def run_plot(result_dir: Path, out: Path | None, annotate: bool, overwrite: bool) -> None:
    """``ckascope plot``: a saved result's figures drawn again, by default into its own folder.

    The result is read first, so a folder that holds none is refused before anything is drawn.
    """
    if not (result_dir / "result.json").is_file():
        raise InputError(
            f"{result_dir} holds no ckascope result (no result.json). Hint: give a folder "
            "ckascope compare wrote, e.g. ckascope plot ckascope-out/resnet18_32-224"
        )
    result = CKAResult.load(result_dir)
    folder = out or result_dir
    if folder.resolve() != result_dir.resolve() and is_result_dir(folder):
        raise InputError(
            f"--out {folder} holds another ckascope result, whose figures would then show "
            f"{result_dir}'s numbers. Hint: choose another --out, or ckascope plot {folder} "
            "to draw that result's own figures"
        )
    paths = redraw(result, folder, annotate=annotate, overwrite=overwrite)
    console = make_console()
    console.print(f"figures written to {folder}/:")
    for path in paths:
        console.print(f"  {path}")


def view_options(cfg: CompareConfig) -> ViewOptions:
    """How the images are prepared and resized, as the options say."""
    return ViewOptions(**values_of(cfg, ViewFields))


def check_sweep(cfg: CompareConfig) -> None:
    """Refuses sweep values no sweep takes (``SweepOptions.check``) before any model is built.

    E.g. a --batch-size under 4 or --permutations beyond the most: not once the sweep starts.
    """
    sweep_options(cfg, 0, 1)


def sweep_options(cfg: CompareConfig, rank: int, world: int) -> SweepOptions:
    """The sweep the options describe, for process ``rank`` of ``world``."""
    return SweepOptions(
        **values_of(cfg, SweepFields),
        progress=True,  # a bar on a terminal, a line every few seconds elsewhere
        rank=rank,
        world_size=world,
    )


def sides(cfg: CompareConfig) -> tuple[SideSpec, SideSpec, dict[str, Any]]:
    """Both sides of the comparison the options describe, and the settings naming the models."""
    model_a, arch_a = resolve_model(
        cfg.model, cfg.weights, cfg.checkpoint, cfg.num_classes, cfg.seed
    )
    settings = _model_settings(cfg.model, arch_a, cfg.weights, cfg.checkpoint, "")
    layers = parse_layers(cfg.layers)
    model_b, layers_b = model_a, layers
    if cfg.two_models:
        model_b, arch_b = resolve_model(
            cfg.model_b, cfg.weights_b, cfg.checkpoint_b, cfg.num_classes, cfg.seed, suffix="-b"
        )
        settings |= _model_settings(cfg.model_b, arch_b, cfg.weights_b, cfg.checkpoint_b, "_b")
        layers_b = parse_layers(cfg.layers_b) if cfg.layers_b else layers
    s_a, s_b = cfg.side_scales
    return SideSpec(model_a, s_a, layers), SideSpec(model_b, s_b, layers_b), settings


def _model_settings(
    name: str | None, arch: str | None, weights: str, checkpoint: Path | None, suffix: str
) -> dict[str, Any]:
    return {
        f"model{suffix}": model_label(name, checkpoint),
        f"arch{suffix}": arch,
        f"weights{suffix}": None if checkpoint else weights,  # a checkpoint's are its own
        f"checkpoint{suffix}": str(checkpoint) if checkpoint else None,
    }


def run(cfg: CompareConfig, rank: int, world: int, device: Any) -> CKAResult:
    """This process's comparison as the (resolved) options describe it."""
    a, b, settings = sides(cfg)
    return compare_sides(
        a,
        b,
        cfg.data,
        view=view_options(cfg),
        sweep=sweep_options(cfg, rank, world),
        device=device,
        settings={**settings, "data": cfg.data or "shapes"},
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
    coarse = [
        coarse_bootstrap_note(int(s.get("bootstrap") or 0), float(s.get("ci") or 0.95)),
        coarse_null_note(int(s.get("permutations") or 0)),
    ]
    for note in filter(None, coarse):  # the table cannot say it; nor the figures (--no-figures)
        click.echo(f"note: {note}", err=True)
    if same_path(s):
        click.echo(
            f"note: both scales went to path {s['paths'][0]} of this multi-path model: this "
            "compares one path with itself. Hint: pick --scales its routing sends to different paths",
            err=True,
        )
    console.print(f"result written to {out}/:")
    for name in sorted(p.name for p in out.iterdir()):
        console.print(f"  {out / name}")


def same_path(settings: dict[str, Any]) -> bool:
    """Whether a cross-scale comparison of a multi-path model routed both scales to one path."""
    paths = settings.get("paths") or []
    return settings.get("mode") == "scales" and len(paths) == 2 and paths[0] == paths[1]


#: Why split points are not weighed on a multi-path model ("FILE holds ...", "this result
#: is of ...": each a whole sentence).
MULTIPATH_REFUSAL = (
    "a multi-path model (each scale routed to its own path or BatchNorm set), and split points "
    "are chosen on a single-path network. Hint: analyse the vanilla model, or price given "
    "points with --split-points"
)


def candidates(result: CKAResult, split_points: str | None) -> list[SplitCandidate]:
    """The vocabulary: given on the command line, or a registered family's for the architecture.

    Given points are taken in forward order whatever order they were typed in; a family that
    knows the architecture checks and prices them as it prices its whole vocabulary.

    Raises:
        InputError: A result without a same-layer diagonal (two models), a multi-path result
            without given points, given points that are not split points of the model (the
            message lists the legal ones), or an architecture no family knows.
    """
    result.diagonal()  # a two-model result is refused in its words, before pricing its scales
    given = _given_points(split_points) if split_points is not None else None
    if given is None and result.settings.get("paths"):
        raise InputError(f"this result is of {MULTIPATH_REFUSAL}")
    known = _family_vocabulary(result.arch, _priced_scales(result)) if result.arch else None
    if given is None:
        if result.arch is None:
            raise InputError("this result records no architecture. Hint: pass --split-points")
        return known if known is not None else split_vocabulary(result.arch)
    if known is None:
        return _placed_points(result, given)
    return _legal_points(result, known, given)


def low_cka_hint(result: CKAResult) -> str:
    """What the reason suggests when no split point's input reaches the threshold.

    More layers can only help when the analysis leaves some of the family's split points
    unmeasured (``--split-points`` then weighed a few); one that shows them all has only the
    threshold left to move. An architecture no family knows keeps the general advice.
    """
    known = _family_vocabulary(result.arch, _priced_scales(result)) if result.arch else None
    if known is None:
        return LOW_CKA_HINT
    missing = unanalysed(result.layers_a, known)
    if not missing:
        return "a lower --threshold"
    return (
        f"a lower --threshold, or an analysis with the default --layers (blocks), to weigh "
        f"{', '.join(missing)} too"
    )


def _given_points(split_points: str) -> list[str]:
    """The names of --split-points, each once."""
    names = [p.strip() for p in split_points.split(",") if p.strip()]
    if not names:
        raise InputError("--split-points is empty. Hint: name split points, e.g. layer1,layer2")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"--split-points lists {', '.join(twice)} twice. Hint: name each split point once"
        )
    return names


def _priced_scales(result: CKAResult) -> tuple[int, int]:
    """The compared scales (smallest, largest) a family prices its candidates for."""
    scales = [s for s in result.settings.get("scales") or [] if isinstance(s, int)]
    return (min(scales), max(scales)) if scales else (32, 224)


def _legal_points(
    result: CKAResult, vocabulary: list[SplitCandidate], given: list[str]
) -> list[SplitCandidate]:
    """The family's candidates ``given`` names (by split point or module), in forward order.

    Each must be measured as the whole vocabulary places it (the stage before it analysed),
    not only among the given ones.
    """
    legal = _refuse_unknown(result.arch, vocabulary, given)
    chosen = {legal[name].name for name in given}
    check_analysed(
        result.layers_a, vocabulary, judged=[c.name for c in vocabulary if c.name in chosen]
    )
    return [c for c in vocabulary if c.name in chosen]


def _refuse_unknown(
    arch: str | None, vocabulary: list[SplitCandidate], given: list[str]
) -> dict[str, SplitCandidate]:
    """The family's candidates by split point and trunk module; refuses a name among neither.

    Raises:
        InputError: A name in ``given`` that is not a split point of ``arch``, listing the legal.
    """
    legal = {name: c for c in vocabulary for name in (c.name, c.trunk_module)}
    unknown = [name for name in given if name not in legal]
    if unknown:
        raise InputError(
            f"--split-points {', '.join(unknown)}: not a legal split point of {arch} "
            f"(legal: {', '.join(c.name for c in vocabulary)}). Hint: pick among them, or leave "
            "out --split-points to weigh them all"
        )
    return legal


def _placed_points(result: CKAResult, given: list[str]) -> list[SplitCandidate]:
    """Given points of an architecture no family knows: unpriced, ordered by the analysed layers."""
    points = [SplitCandidate(name) for name in given]
    lost = [p.name for p in points if position(result.layers_a, p.trunk_module) is None]
    if lost:
        known = f"{result.arch!r}" if result.arch else "this result's model"
        raise InputError(
            f"--split-points {', '.join(lost)}: cannot be placed among the analysed layers "
            f"({', '.join(result.layers_a[:4])}, ...), and no registered family knows the split "
            f"points of {known}. Hint: give module names of the analysed model where a trunk "
            "could start"
        )
    return in_forward_order(result.layers_a, points)


def split_vocabulary(arch: str, scales: tuple[int, int] = (32, 224)) -> list[SplitCandidate]:
    """The split points of ``arch`` from the first registered family that knows it.

    Args:
        arch: The analysed architecture.
        scales: The compared scales (smallest, largest): the family prices its candidates for
            a network built for them.

    Raises:
        InputError: No registered family knows ``arch``.
    """
    vocabulary = _family_vocabulary(arch, scales)
    if vocabulary is not None:
        return vocabulary
    families = plugins.list_entries("split_vocabularies")
    raise InputError(
        f"no registered model family knows the split points of {arch!r} (families: "
        f"{', '.join(families) or 'none'}). Hint: pass --split-points"
    )


def _family_vocabulary(arch: str, scales: tuple[int, int]) -> list[SplitCandidate] | None:
    """The first registered family's split points of ``arch`` (priced), None if none knows it."""
    found = _priced_vocabulary(arch, scales)
    return None if found is None else list(found)


@functools.lru_cache(maxsize=8)
def _priced_vocabulary(arch: str, scales: tuple[int, int]) -> tuple[SplitCandidate, ...] | None:
    # pricing builds the family's networks (seconds for a resnet50); suggest-split checks the
    # given points before its comparison and reads them after it, so the second is a lookup
    for family in plugins.list_entries("split_vocabularies"):
        found = plugins.load("split_vocabularies", family)(arch, scales)
        if found is not None:
            return tuple(found)
    return None
