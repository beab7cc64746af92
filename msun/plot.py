"""The paper's Figure 4: top-1 accuracy against test size, one curve per model.

The legend carries what the paper prints beside the curves: mean accuracy over the test sizes,
mean FLOPs per image and parameters. Drawn with matplotlib's object API (no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ckascope.platform import save
from msun.evaluate import Evaluated


def accuracy_vs_size(summaries: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Routed top-1 per test size for every evaluated checkpoint.

    Args:
        summaries: ``Evaluated.summary()`` of each checkpoint, as ``msun eval`` writes them to
            eval.json (so a figure can be drawn again from its numbers alone).
        title: The axes' title [the protocol of the first].
    """
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for r in summaries:
        label = (
            f"{r['checkpoint']} ({r.get('variant', r['method'])}): mean {r['mean_top1']:.1f}%, "
            f"{r['mean_flops'] / 1e9:.2f} GFLOPs, {r['parameters'] / 1e6:.2f} M params"
        )
        ax.plot(r["sizes"], r["top1"], marker="o", label=label)
    ax.set_xticks(sorted({s for r in summaries for s in r["sizes"]}))
    ax.set_xlabel("test image size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")  # never over the curves
    ax.set_title(title or f"Accuracy vs test size ({summaries[0]['protocol']} protocol)")
    return fig


def save_accuracy_figure(
    evaluated: Sequence[Evaluated], folder: Path, title: str | None = None
) -> list[Path]:
    """figure4.png and figure4.pdf in ``folder``."""
    summaries = [ev.summary() for ev in evaluated]
    return save(accuracy_vs_size(summaries, title=title), folder / "figure4")
