"""The paper's Figure 4: top-1 accuracy against test size, one curve per model.

The legend carries what the paper prints beside the curves: mean accuracy over the test sizes,
mean FLOPs per image and parameters. Drawn with matplotlib's object API (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ckascope.plot import save
from msun.evaluate import Evaluated


def accuracy_vs_size(evaluated: Sequence[Evaluated], *, title: str | None = None) -> Figure:
    """Routed top-1 per test size for every evaluated checkpoint."""
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for ev in evaluated:
        r = ev.result
        label = f"{ev.name} ({ev.method}): mean {r.mean_top1:.1f}%, {ev.mean_flops / 1e9:.2f} GFLOPs, {ev.parameters / 1e6:.2f} M params"
        ax.plot(r.sizes, r.routed_top1, marker="o", label=label)
    sizes = sorted({s for ev in evaluated for s in ev.result.sizes})
    ax.set_xticks(sizes)
    ax.set_xlabel("test image size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")  # never over the curves
    ax.set_title(title or f"Accuracy vs test size ({evaluated[0].result.protocol} protocol)")
    return fig


def save_accuracy_figure(
    evaluated: Sequence[Evaluated], folder: Path, title: str | None = None
) -> list[Path]:
    """figure4.png and figure4.pdf in ``folder``."""
    return save(accuracy_vs_size(evaluated, title=title), folder / "figure4")
