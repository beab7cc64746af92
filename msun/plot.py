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
from msun.evaluate import Evaluated, shared_protocol


def accuracy_vs_size(summaries: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Routed top-1 per test size for every evaluated checkpoint.

    Args:
        summaries: ``Evaluated.summary()`` of each checkpoint, as ``msun eval`` writes them to
            eval.json (so a figure can be drawn again from its numbers alone).
        title: The axes' title [the protocol all curves share, else "protocol per curve",
            each legend entry then naming its own].
    """
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    shared = shared_protocol(r["protocol"] for r in summaries)
    for r in summaries:
        protocol = "" if shared else f", {r['protocol']} protocol"
        label = (
            f"{r['checkpoint']} ({r.get('variant', r['method'])}{protocol}): mean "
            f"{r['mean_top1']:.1f}%, {r['mean_flops'] / 1e9:.2f} GFLOPs, "
            f"{r['parameters'] / 1e6:.2f} M params"
        )
        ax.plot(r["sizes"], r["top1"], marker="o", label=label)
    ax.set_xticks(sorted({s for r in summaries for s in r["sizes"]}))
    ax.set_xlabel("test image size (px)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")  # never over the curves
    heading = f"{shared} protocol" if shared else "protocol per curve"
    ax.set_title(title or f"Accuracy vs test size ({heading})")
    return fig


def save_accuracy_figure(
    evaluated: Sequence[Evaluated], folder: Path, title: str | None = None
) -> list[Path]:
    """figure4.png and figure4.pdf in ``folder``."""
    summaries = [ev.summary() for ev in evaluated]
    return save(accuracy_vs_size(summaries, title=title), folder / "figure4")
