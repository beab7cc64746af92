"""Rebuilds the paper-style figures from the project's own runs on the synthetic set.

    python figures/make_figures.py                                # the committed figures (~2 h on 2 CPU cores)
    python figures/make_figures.py --quick --out /tmp/figs-quick --runs /tmp/figs-quick/runs  # smoke run

Training runs live under ``--runs`` (default ``runs/figures``): a finished run is reused (a rerun
only re-evaluates and redraws), an interrupted one resumed, and a folder holding a run with other
settings refused (``msun.train.train_or_reuse``).

Steps:

1. train vanilla, MST and MSUN (split layer2; the published SI term and the authors' revision)
   on the same backbone, data and budget;
2. Figure 4: ``msun eval`` of the four over the test sizes (accuracy, mean FLOPs, parameters);
3. Figure 2 and heatmaps: ``ckascope compare`` of the trained vanilla model and the trained MSUNs
   (routed paths) at the smallest vs the largest scale, mean +- std over sweeps; linear CKA, and
   RBF CKA as a check on linear CKA's sensitivity to a few large-norm images;
4. the loop: ``ckascope suggest-split`` on the vanilla model's analysis;
5. the split-point ablation: MSUN (revised SI) trained with the trunk starting at layer1..layer4
   on the same budget, mean accuracy over the test sizes against the split point.

Writes <out>/*.png (default: this folder) and <out>/data/*.json, the numbers each PNG was drawn
from, and the CKA results under <out>/data/cka_*.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from ckascope.platform import (
    CKAResult,
    InputError,
    Kernel,
    atomic_path,
    build_dataset,
    collate_skip,
    compare_scales,
    curve,
    dataset_len,
    eval_transform,
    heatmap,
    load_checkpoint,
    plan_batches,
    subset_indices,
    suggest_split,
    write_json,
)
from msun.config import TrainConfig, parse_sizes
from msun.evaluate import Evaluated, evaluate_checkpoints, load_for_eval
from msun.plot import accuracy_vs_size
from msun.splits import split_candidates
from msun.train import train_or_reuse

HERE = Path(__file__).resolve().parent
SPLITS = ("layer1", "layer2", "layer3", "layer4")
# Figure 4's runs: folder name -> (method, split, SI options). MSUN with the published SI term
# (weight 1, all pairs) and with the authors' later revision (weight 0.1, against the largest).
RUNS: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "vanilla": ("vanilla", None, {}),
    "mst": ("mst", None, {}),
    "msun": ("msun", "layer2", {}),
    "msun_si0.1_largest": ("msun", "layer2", {"si_weight": 0.1, "si_pairs": "largest"}),
}
# The ablation varies the split of this run (same budget and SI; its own split point is reused):
# the published SI term leaves MSUN on its initial plateau at this budget (Figure 4).
ABLATION_RUN = "msun_si0.1_largest"


def settings(quick: bool) -> dict[str, Any]:
    """The training and analysis settings of the committed figures (or of a smoke run)."""
    if quick:
        return {
            "image_size": 32,
            "scales": (8, 16, 32),
            "num_train": 64,
            "num_val": 32,
            "epochs": 1,
            "batch_size": 16,
            "eval_sizes": "8:32:8",
            "cka_images": 32,
            "cka_repeats": 2,
        }
    return {
        "image_size": 64,
        "scales": (16, 32, 64),
        "num_train": 8000,
        "num_val": 1000,
        "epochs": 8,
        "batch_size": 32,
        "eval_sizes": "16:64:8",
        "cka_images": 512,
        "cka_repeats": 3,
    }


def budget(s: dict[str, Any]) -> dict[str, Any]:
    """The size of a run: image size, images, epochs and batch (the same for every method)."""
    return {k: s[k] for k in ("image_size", "num_train", "num_val", "epochs", "batch_size")}


def train_config(
    s: dict[str, Any], method: str, out: Path, split: str | None = None, **si: Any
) -> TrainConfig:
    """One run of the comparison: resnet18 from scratch on the synthetic set, same budget for all.

    The recipe's optimiser and schedule shape, at a CPU-sized budget: lr 0.05 for batch 32, 0.3
    warm-up epochs, and crops of at least 35 % of the image (smaller ones often hold no object).
    ``si`` overrides the scale-invariance options (``si_weight``, ``si_pairs``).
    """
    return TrainConfig(
        model="resnet18",
        method=method,
        split_at=split,
        scales=s["scales"],
        data="shapes",
        out=str(out),
        **budget(s),
        lr=0.05,
        warmup_epochs=0.3,
        crop_scale_min=0.35,
        eval_sizes=s["eval_sizes"],
        eval_every=2,
        seed=0,
        **si,
    )


def run(cfg: TrainConfig) -> Path:
    """``msun.train.train_or_reuse``: trains, resumes or reuses the run; returns its last.pt.

    Raises:
        SystemExit: The folder holds a run with other settings (never overwritten); the
            library's one-line message, without a traceback.
    """
    try:
        return train_or_reuse(cfg)
    except InputError as e:
        raise SystemExit(str(e)) from e


def evaluate_runs(checkpoints: list[Path], s: dict[str, Any]) -> list[Evaluated]:
    """``msun eval`` of the checkpoints on the same validation images."""
    size = s["image_size"]
    data = build_dataset(
        "shapes",
        "val",
        eval_transform(size),
        num_images=s["num_val"],
        synthetic_size=size,
    )
    idx = subset_indices(dataset_len(data), None, 0)
    loader = DataLoader(
        data,
        batch_sampler=plan_batches(idx, 64),
        collate_fn=collate_skip,
    )
    loaded = [load_for_eval(p) for p in checkpoints]
    return evaluate_checkpoints(
        loaded,
        loader,
        parse_sizes(s["eval_sizes"]),
        protocol="upsample",
        paths="all",
        device=torch.device("cpu"),
        data="shapes",
        image_size=size,
    )


def png(fig: Figure, out: Path, name: str) -> Path:
    """Writes <out>/<name>.png atomically."""
    path = out / f"{name}.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    return path


def cka(
    checkpoint: Path, s: dict[str, Any], name: str, out: Path, kernel: Kernel = "linear"
) -> CKAResult:
    """Cross-scale CKA of a trained model at its smallest vs largest scale."""
    model = load_checkpoint(checkpoint)
    scales = (min(s["scales"]), max(s["scales"]))
    result = compare_scales(
        model,
        "shapes",
        scales,
        image_size=s["image_size"],
        num_images=s["cka_images"],
        batch_size=64,
        repeats=s["cka_repeats"],
        kernel=kernel,
        settings={"model": name},
    )
    result.save(out / "data" / f"cka_{name}", overwrite=True)
    return result


def ablation_figure(
    rows: list[dict[str, Any]],
    choice: str | None = None,
    title: str = "MSUN split-point ablation (resnet18, synthetic, revised SI)",
) -> Figure:
    """Mean accuracy over the test sizes against the split point, suggest-split's ``choice`` ringed."""
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    splits, means = [r["split_at"] for r in rows], [r["mean_top1"] for r in rows]
    ax.plot(splits, means, marker="o")
    if choice is not None and choice in splits:
        ax.scatter(
            [choice],
            [means[splits.index(choice)]],
            s=220,
            facecolors="none",
            edgecolors="C3",
            linewidths=1.5,
            label=f"suggest-split: {choice}",
        )
        ax.legend(loc="lower left", fontsize=8)
    for r in rows:
        ax.annotate(
            f"{r['mean_top1']:.1f}%\n+{r['extra_params'] / 1e6:.2f} M",
            (r["split_at"], r["mean_top1"]),
            textcoords="offset points",
            xytext=(0, 10),
            ha="center",
            fontsize=8,
        )
    ax.margins(x=0.1, y=0.25)
    ax.set_xlabel("split point (first stage of the shared trunk)")
    ax.set_ylabel("mean top-1 over test sizes (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def figure4(runs: dict[str, Path], s: dict[str, Any], out: Path) -> dict[str, Evaluated]:
    """Accuracy vs test size of vanilla, MST and MSUN, with mean accuracy, FLOPs, parameters."""
    evaluated = evaluate_runs([runs[m] for m in RUNS], s)
    write_json(
        out / "data" / "fig4_accuracy.json",
        {"settings": _plain(s), "models": [e.summary() for e in evaluated]},
    )
    draw_figure4(out)
    return dict(zip(RUNS, evaluated, strict=True))


def draw_figure4(out: Path) -> None:
    """fig4_accuracy.png from the numbers in <out>/data/fig4_accuracy.json."""
    models = json.loads((out / "data" / "fig4_accuracy.json").read_text())["models"]
    title = "Top-1 vs test size (resnet18, synthetic, upsample protocol)"
    png(accuracy_vs_size(models, title=title), out, "fig4_accuracy")


# Figure 2's models: run name -> label. Every MSUN is measured through its routed paths.
CKA_LABELS = {
    "vanilla": "vanilla",
    "msun": "MSUN, published SI (λ 1)",
    "msun_si0.1_largest": "MSUN, revised SI (λ 0.1)",
}


def figure2(runs: dict[str, Path], s: dict[str, Any], out: Path) -> CKAResult:
    """Same-layer cross-scale CKA of vanilla and the MSUNs, and their heatmaps; returns vanilla's."""
    results = {name: cka(runs[name], s, name, out) for name in CKA_LABELS}
    labels = list(CKA_LABELS.values())
    png(curve(list(results.values()), labels=labels), out, "fig2_cross_scale_cka")
    for name, result in results.items():
        png(heatmap(result, title=f"{CKA_LABELS[name]}, resnet18"), out, f"heatmap_{name}")
    # Again with the RBF kernel (median bandwidth): in the revised MSUN's deep trunk a few images
    # have feature norms up to 19x the median and dominate linear CKA (figures/outliers.py).
    rbf = [cka(runs[name], s, f"{name}_rbf", out, kernel="rbf") for name in CKA_LABELS]
    png(curve(rbf, labels=labels), out, "fig2_cross_scale_cka_rbf")
    return results["vanilla"]


def the_loop(s: dict[str, Any], out: Path, analysis: CKAResult) -> str:
    """``suggest-split`` on the trained vanilla model's analysis; returns the choice."""
    suggestion = suggest_split(analysis, split_candidates("resnet18", s["scales"]))
    write_json(out / "data" / "suggest_split_vanilla.json", suggestion.to_dict())
    return suggestion.choice


def ablation(
    s: dict[str, Any], out: Path, evaluated: dict[str, Evaluated], folder: Path, choice: str
) -> list[dict[str, Any]]:
    """MSUN with every split point, else as ``ABLATION_RUN`` (whose evaluation in ``evaluated``,
    Figure 4's, is reused): mean accuracy against the split."""
    method, reused, si = RUNS[ABLATION_RUN]
    assert reused is not None  # an MSUN run has its split
    trained = {
        split: run(train_config(s, method, folder / f"ablation_{split}", split, **si))
        for split in SPLITS
        if split != reused
    }
    results = dict(zip(trained, evaluate_runs(list(trained.values()), s), strict=True))
    results[reused] = evaluated[ABLATION_RUN]
    costs = {c.name: c.extra_params for c in split_candidates("resnet18", s["scales"])}
    rows = [
        {"split_at": split, "extra_params": costs[split], **results[split].summary()}
        for split in SPLITS
    ]
    write_json(
        out / "data" / "ablation_split.json",
        {"settings": _plain(s), "si": si, "rows": rows, "suggest_split": choice},
    )
    png(ablation_figure(rows, choice), out, "ablation_split")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke settings (figures are not the committed ones)",
    )
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/figures"), help="where the training runs live"
    )
    parser.add_argument("--out", type=Path, default=HERE, help="where the PNGs and data go")
    parser.add_argument(
        "--skip-ablation",
        action="store_true",
        help="stop after Figure 4, Figure 2 and the heatmaps",
    )
    parser.add_argument(
        "--redraw-figure4",
        action="store_true",
        help="only draw Figure 4 again from <out>/data/fig4_accuracy.json (no runs needed)",
    )
    args = parser.parse_args()
    s, out = settings(args.quick), args.out
    if args.redraw_figure4:
        draw_figure4(out)
        return
    (out / "data").mkdir(parents=True, exist_ok=True)
    runs = {
        name: run(train_config(s, method, args.runs / name, split, **si))
        for name, (method, split, si) in RUNS.items()
    }
    evaluated = figure4(runs, s, out)
    choice = the_loop(s, out, figure2(runs, s, out))
    if args.skip_ablation:
        return
    rows = ablation(s, out, evaluated, args.runs, choice)
    print(json.dumps(rows, indent=2))


def _plain(s: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}


if __name__ == "__main__":
    main()
