"""Paper-style figures of CKA results: the cross-layer heatmap and the same-layer curve (Fig. 2).

Only matplotlib's object API is used (no pyplot), so drawing needs no display and does not
touch the caller's backend. Files are written atomically, PNG and PDF.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ckascope.fileio import atomic_path
from ckascope.result import CKAResult

FORMATS = ("png", "pdf")


def side_labels(result: CKAResult) -> tuple[str, str]:
    """Axis titles of the two sides, from the result's settings."""
    s = result.settings
    if s.get("mode") == "models":
        return f"{s.get('model', 'model a')} layer", f"{s.get('model_b', 'model b')} layer"
    scales = s.get("scales", ["a", "b"])
    return f"layer at {scales[0]} px", f"layer at {scales[1]} px"


def _title(result: CKAResult) -> str:
    s = result.settings
    kind = f"{s.get('kernel', 'linear')} CKA"
    model = str(s.get("model", ""))
    if s.get("mode") == "models":
        model = (
            f"{model} vs {s.get('model_b', 'model b')}, {kind} at {s.get('scales', ['?'])[0]} px"
        )
    else:
        model = f"{model} {kind}".strip()
    return model + (f", mean of {result.repeats} sweeps" if result.repeats > 1 else "")


def heatmap(result: CKAResult, *, title: str | None = None) -> Figure:
    """Cross-layer CKA matrix: rows = side a (first layer at the bottom), columns = side b.

    The colour scale is [0, 1] unless values fall outside it; NaN cells are hatched grey.
    """
    m = result.matrix
    finite = m[np.isfinite(m)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    # The canvas follows the matrix's shape (square cells), plus room for labels and colour bar.
    cell = 0.32
    fig = Figure(
        figsize=(3.2 + cell * len(result.layers_b), 2.6 + cell * len(result.layers_a)),
        layout="constrained",
    )
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
        xticklabels=result.layers_b,
        yticklabels=result.layers_a,
        cbar_kws={"label": "CKA", "shrink": 0.8},
    )
    ax.tick_params(axis="y", labelrotation=0)
    ax.invert_yaxis()
    label_a, label_b = side_labels(result)
    ax.set_xlabel(label_b)
    ax.set_ylabel(label_a)
    ax.set_title(title or _title(result))
    if not np.isfinite(m).all():
        ax.legend(
            handles=[Patch(facecolor="0.85", edgecolor="0.55", hatch="xx", label="NaN")],
            loc="upper left",
        )
    return fig


def curve(
    results: CKAResult | Sequence[CKAResult],
    labels: Sequence[str] | None = None,
    *,
    title: str | None = None,
) -> Figure:
    """Same-layer cross-scale CKA against layer depth, mean ± std band per result (Fig. 2).

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
    for result, name in zip(items, names, strict=True):
        d = result.diagonal()
        ax.plot(d["depth"], d["mean"], marker="o", label=name)
        ax.fill_between(d["depth"], d["mean"] - d["std"], d["mean"] + d["std"], alpha=0.25)
    ax.set_xticks(range(len(longest.layers_a)), longest.layers_a, rotation=60, ha="right")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), max(1.0, ax.get_ylim()[1]))
    scales = items[0].settings.get("scales", ["a", "b"])
    ax.set_ylabel(f"CKA, same layer at {scales[0]} vs {scales[1]} px")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        title or f"Cross-scale CKA per layer ({items[0].settings.get('kernel', 'linear')})"
    )
    return fig


def save(fig: Figure, stem: Path) -> list[Path]:
    """Writes ``stem.png`` and ``stem.pdf`` atomically."""
    paths = []
    for ext in FORMATS:
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        paths.append(path)
    return paths


def save_figures(result: CKAResult, folder: Path) -> list[Path]:
    """The heatmap, and the same-layer curve when the result has a diagonal, into ``folder``."""
    paths = save(heatmap(result), folder / "heatmap")
    if result.has_diagonal:
        paths += save(curve(result), folder / "curve")
    return paths
