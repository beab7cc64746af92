"""Paper-style figures of CKA results: the cross-layer heatmap and the same-layer curve (Fig. 2).

Only matplotlib's object API is used (no pyplot), so drawing needs no display and does not
touch the caller's backend. Files are written atomically, PNG and PDF.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ckascope.data import dataset_name, is_synthetic
from ckascope.errors import InputError
from ckascope.fileio import atomic_path, staging_dir
from ckascope.result import FIGURE_STAGING, CKAResult, check_writable_folder

FORMATS = ("png", "pdf")
#: Characters of the heatmap's title (matplotlib's default "large", 12 pt) an inch holds: its
#: lines are wrapped to the figure's width, which follows the matrix's.
TITLE_CHARS_PER_INCH = 10
#: Cells whose permutation p-value exceeds this are marked as not beating the null.
ALPHA = 0.05


def side_labels(result: CKAResult) -> tuple[str, str]:
    """Axis titles of the two sides, from the result's settings."""
    s = result.settings
    if s.get("mode") == "models":
        return f"{s.get('model', 'model a')} layer", f"{s.get('model_b', 'model b')} layer"
    scales = s.get("scales", ["a", "b"])
    return f"layer at {scales[0]} px", f"layer at {scales[1]} px"


def _title(result: CKAResult, width: int = 80) -> str:
    """The heatmap's title: models, kernel, sweeps; under it the inputs, each ``width`` wide."""
    lines = [_heading(result), _inputs(result.settings)]
    return "\n".join(textwrap.fill(line, width) for line in lines if line)


def _heading(result: CKAResult) -> str:
    s = result.settings
    kind = f"{s.get('kernel', 'linear')} CKA"
    model = str(s.get("model", ""))
    if s.get("mode") == "models":
        model = (
            f"{model} vs {s.get('model_b', 'model b')}, {kind} at {s.get('scales', ['?'])[0]} px"
        )
    else:
        model = f"{model} {kind}".strip()
    sweeps = f", mean of {result.repeats} sweeps" if result.repeats > 1 else ""
    return model + sweeps


def _inputs(settings: dict[str, Any]) -> str:
    """The subtitle: what the result was measured with, weights and images, in a few words.

    Empty for a result that records neither (one made in Python without such settings).
    """
    parts = [*_weights_words(settings), *_data_words(settings)]
    return f"({', '.join(parts)})" if parts else ""


def _weights_words(settings: dict[str, Any]) -> list[str]:
    """Each side's weights, once when both sides have the same, else by model."""
    sides = [(settings.get(f"model{k}"), _weights_of(settings, k)) for k in ("", "_b")]
    words = [(model, w) for model, w in sides if w is not None]
    if len({w for _, w in words}) < 2:
        return [w for _, w in words][:1]
    return [f"{model}: {w}" for model, w in words]


def _weights_of(settings: dict[str, Any], suffix: str) -> str | None:
    """One side's weights: random, pretrained (which), or the checkpoint's file; None: unknown."""
    checkpoint, weights = settings.get(f"checkpoint{suffix}"), settings.get(f"weights{suffix}")
    if checkpoint:
        path = Path(str(checkpoint))  # a run's last.pt / best.pt is known by its folder
        shown = f"{path.parent.name}/{path.name}" if path.stem in ("last", "best") else path.name
        return f"checkpoint {shown}"
    if weights is None:
        return None
    if weights == "none":
        return "random weights"
    return "pretrained weights" if str(weights).lower() == "default" else f"{weights} weights"


def _data_words(settings: dict[str, Any]) -> list[str]:
    """The images: synthetic, the set's name, or the last two parts of a folder's path."""
    if "data" not in settings:
        return []
    spec = settings["data"]
    if is_synthetic(spec):
        return ["synthetic images"]
    return [dataset_name(spec) or _folder_words(str(spec))]


def _folder_words(spec: str) -> str:
    """A folder's last two names (``imagenet/val``); the spec as given where it has none."""
    path = Path(spec).expanduser()  # as given: a redraw may run elsewhere
    names = [part for part in path.parts if part != path.anchor][-2:]
    return "/".join(names) or spec


def heatmap(
    result: CKAResult,
    *,
    title: str | None = None,
    mark_null: bool = True,
    annotate: bool = False,
) -> Figure:
    """Cross-layer CKA matrix: rows = side a (first layer at the bottom), columns = side b.

    The colour scale is [0, 1] unless values fall outside it; NaN cells are hatched grey. With a
    permutation null in the result (and ``mark_null``), cells whose p-value exceeds ``ALPHA``
    (no better than chance on these images) carry a small grey circle; ``annotate`` prints each
    cell's value.
    """
    m = result.matrix
    finite = m[np.isfinite(m)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    # The canvas follows the matrix's shape (square cells), plus room for labels and colour bar.
    cell = 0.32
    width = 3.2 + cell * len(result.layers_b)
    fig = Figure(figsize=(width, 2.2 + cell * len(result.layers_a)), layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("0.85")
    ax.patch.set_hatch("xx")
    ax.patch.set_edgecolor("0.55")
    sns.heatmap(
        m,
        ax=ax,
        vmin=vmin,
        vmax=vmax,
        cmap="magma",
        square=True,
        mask=~np.isfinite(m),
        annot=annotate,
        fmt=".2f",
        annot_kws={"fontsize": 6},
        xticklabels=result.layers_b,
        yticklabels=result.layers_a,
        cbar_kws={"label": "CKA", "shrink": 0.8},
    )
    ax.tick_params(axis="y", labelrotation=0)
    ax.invert_yaxis()
    label_a, label_b = side_labels(result)
    ax.set_xlabel(label_b)
    ax.set_ylabel(label_a)
    ax.set_title(title or _title(result, width=int(TITLE_CHARS_PER_INCH * width)))
    handles = _mark_chance(ax, result) if mark_null else []
    if not np.isfinite(m).all():
        handles.append(Patch(facecolor="0.85", edgecolor="0.55", hatch="xx", label="NaN"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, frameon=False)
    return fig


def _mark_chance(ax: Any, result: CKAResult) -> list[Any]:
    """Circles on the cells the permutation null does not rule out; their legend entry.

    With fewer than 1/ALPHA - 1 permutations no p-value can reach ALPHA: nothing is circled and
    the legend says so.
    """
    p_value = result.cell("p_value")
    if p_value is None:
        return []
    n = int(result.settings.get("permutations", 0))
    if 1.0 / (n + 1) > ALPHA:
        need = int(np.ceil(1.0 / ALPHA)) - 1
        label = f"{n} permutations cannot test at p <= {ALPHA} (need {need})"
        return [Line2D([], [], ls="", marker="", label=label)]
    rows, cols = np.nonzero(~(p_value <= ALPHA))  # NaN p-values count as not beating it
    if not len(rows):
        return []
    ax.scatter(cols + 0.5, rows + 0.5, s=30, facecolors="none", edgecolors="0.75", zorder=3)
    label = f"p > {ALPHA} ({n} permutations, per cell, uncorrected): not above chance"
    return [Line2D([], [], ls="", marker="o", mfc="none", mec="0.6", label=label)]


#: The legend entry of the permutation null's band, after every result's line.
NULL_BAND = "chance: permutation null, mean ± 2 std"


def curve(
    results: CKAResult | Sequence[CKAResult],
    labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Same-layer cross-scale CKA against layer depth, one line per result (Fig. 2).

    The band is the bootstrap interval where the result has one (``--bootstrap``), else ± the
    std over sweeps; a result with a permutation null also gets it as a grey band (null mean
    ± 2 std: where CKA of shuffled image pairs falls).

    Args:
        results: One result or several (e.g. single- and multi-path) with same-layer diagonals.
        labels: Legend entries (default: the model name in each result's settings).
        title: Figure title.
    """
    items = [results] if isinstance(results, CKAResult) else list(results)
    names = (
        list(labels)
        if labels is not None
        else [str(r.settings.get("model", f"result {i}")) for i, r in enumerate(items)]
    )
    longest = max(items, key=lambda r: len(r.layers_a))
    fig = Figure(figsize=(4 + 0.3 * len(longest.layers_a), 4), layout="constrained")
    ax = fig.subplots()
    for i, (result, name) in enumerate(zip(items, names, strict=True)):
        _curve_line(ax, result, name, f"C{i}", first_null=i == 0)
    ax.set_xticks(range(len(longest.layers_a)), longest.layers_a, rotation=60, ha="right")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(1.0, ax.get_ylim()[1]))
    scales = items[0].settings.get("scales", ["a", "b"])
    ax.set_ylabel(f"CKA, same layer at {scales[0]} vs {scales[1]} px")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    handles, texts = ax.get_legend_handles_labels()
    order = sorted(range(len(texts)), key=lambda k: texts[k] == NULL_BAND)  # chance last
    fig.legend(  # off the curves
        [handles[k] for k in order],
        [texts[k] for k in order],
        loc="outside lower center",
        fontsize=8,
        ncols=2,
        frameon=False,
    )
    ax.set_title(
        title or f"Cross-scale CKA per layer ({items[0].settings.get('kernel', 'linear')})"
    )
    return fig


def _curve_line(ax: Any, result: CKAResult, name: str, color: str, first_null: bool) -> None:
    d = result.diagonal()
    idx = np.arange(len(d))
    band = _band(result)
    line = name if band is None else f"{name} ({band[1]})"  # the legend names a drawn band only
    ax.plot(d["depth"], d["mean"], marker="o", color=color, label=line)
    if band is not None:
        ax.fill_between(d["depth"], *band[0], color=color, alpha=0.25)
    null_mean, null_std = result.cell("null_mean"), result.cell("null_std")
    if null_mean is not None and null_std is not None:
        m, s = null_mean[idx, idx], null_std[idx, idx]
        label = NULL_BAND if first_null else None
        ax.fill_between(d["depth"], m - 2 * s, m + 2 * s, color="0.5", alpha=0.25, label=label)


def _band(result: CKAResult) -> tuple[tuple[np.ndarray, np.ndarray], str] | None:
    """The band around the same-layer curve and what it is; None when there is none to draw.

    The bootstrap interval where it has values (one batch gives NaN), else ± the std over
    sweeps when there are several (one sweep has no spread).
    """
    idx = np.arange(len(result.layers_a))
    low, high = result.cell("ci_low"), result.cell("ci_high")
    if low is not None and high is not None and np.isfinite(low[idx, idx]).any():
        level = 100 * float(result.settings.get("ci") or 0.95)
        return (low[idx, idx], high[idx, idx]), f"{level:g} % interval"
    if result.repeats > 1:
        mean, std = result.matrix[idx, idx], result.std[idx, idx]
        return (mean - std, mean + std), "± std over sweeps"
    return None


def save(fig: Figure, stem: Path) -> list[Path]:
    """Writes ``stem.png`` and ``stem.pdf`` atomically, creating their folder if it is missing."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in FORMATS:
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        paths.append(path)
    return paths


def save_figures(result: CKAResult, folder: Path, *, annotate: bool = False) -> list[Path]:
    """The heatmap, and the same-layer curve when the result has a diagonal, into ``folder``."""
    paths = save(heatmap(result, annotate=annotate), folder / "heatmap")
    if result.has_diagonal:
        paths += save(curve(result), folder / "curve")
    return paths


def figure_names(result: CKAResult) -> list[str]:
    """The files ``save_figures`` writes for ``result`` (heatmap, and curve with a diagonal)."""
    stems = ["heatmap", *(["curve"] if result.has_diagonal else [])]
    return [f"{stem}.{ext}" for stem in stems for ext in FORMATS]


def redraw(
    result: CKAResult, folder: Path, *, annotate: bool = False, overwrite: bool = False
) -> list[Path]:
    """Draws ``result``'s figures (``save_figures``) into ``folder``, beside what it holds.

    All figures are drawn in a hidden staging folder first and moved in only when every one is
    drawn, so a failure while drawing leaves the files in ``folder`` as they were; nothing but
    the figures' own files is ever replaced.

    Args:
        result: The result to draw (e.g. ``CKAResult.load`` of a saved one).
        folder: Where the figures go; created when missing.
        annotate: Print each cell's CKA in the heatmap.
        overwrite: Replace figure files of the same names already in ``folder``.

    Returns:
        The files written.

    Raises:
        InputError: ``folder`` cannot be written, or already holds a figure and not
            ``overwrite``.
    """
    names = figure_names(result)
    _check_figures_free(folder, names, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    # a killed redraw's staging stays (hidden; a result folder counts it as its own), as a
    # redraw running beside this one into the same folder may still be drawing in it
    staging = staging_dir(folder / FIGURE_STAGING, ".tmp")
    try:
        save_figures(result, staging, annotate=annotate)
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in names]


def _check_figures_free(folder: Path, names: list[str], overwrite: bool) -> None:
    """Refuses a folder that would lose a file: a figure already there unless ``overwrite``."""
    check_writable_folder(folder)
    taken = [name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if taken and not overwrite:
        raise InputError(
            f"{folder} already holds {', '.join(taken)}. Hint: pass --overwrite "
            "(overwrite=True from Python) to draw them again, or choose another --out"
        )
    for name in taken:
        if (folder / name).is_dir():
            raise InputError(
                f"{folder / name} is a folder, not a figure. Hint: choose another --out"
            )
