"""The paper's claims on real images: vanilla, MST and MSUN on Fashion-MNIST, several seeds.

    python figures/fashion_study.py                  # the committed study (about 90 min, 2 CPU cores)
    python figures/fashion_study.py --redraw         # figures and RESULTS.md from the committed data
    python figures/fashion_study.py --quick --data fashionmnist:DIR --out /tmp/fq --runs /tmp/fq/runs

The paper's geometry scaled to the data: ResNet-18 from scratch on the native 28-px images,
nominal scales 4 / 16 / 28 (the paper's 32 / 128 / 224 times 1/8: the same 1 : 4 : 7 ratios),
the 13 test sizes 4, 6, ..., 28 (1/7 .. 1 of the training size, as 32..224). Every method trains
with the same data, budget, optimiser and schedule (the recipe's shapes, the project's learning
rate rule); only what defines the method differs (its loss, its subnets, MSUN's gradient clip).

Steps (each one is reused when its output exists, so an interrupted study resumes):

1. train vanilla, MST, MSUN with the published SI term and MSUN with the revised one, per seed;
2. evaluate each on the same test images at the 13 sizes: routed top-1 (routing fixed in
   advance) and, labelled as such, the paper's best path per size chosen on the test images;
3. Figure 2: same-layer CKA, smallest vs full size, of the seed-0 models (10 sweeps of random
   test subsets, mean +- std), and their heatmaps;
4. the loop: ``suggest-split`` on the trained vanilla model's analysis, ``msun train --split-at
   auto --cka-from`` that analysis, and the split-point ablation (trunk at layer1..layer4, seed
   0, published SI) that says whether the suggested split was the best one;
5. RESULTS.md: every table and the verdict on the criteria below, drawn from data/ only.

The criteria were written down before the runs (figures/README.md) and are applied as coded here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_figures, beside this script

from make_figures import ablation_figure, budget, png, run  # noqa: E402

from ckascope.compare import compare_scales  # noqa: E402
from ckascope.data import (  # noqa: E402
    build_dataset,
    collate_skip,
    dataset_len,
    eval_transform,
    plan_batches,
    subset_indices,
)
from ckascope.fileio import write_json, write_text  # noqa: E402
from ckascope.models import load_checkpoint, read_checkpoint  # noqa: E402
from ckascope.plot import curve, heatmap  # noqa: E402
from ckascope.result import CKAResult  # noqa: E402
from ckascope.split import suggest_split  # noqa: E402
from ckascope.vocab import Kernel  # noqa: E402
from msun.config import TrainConfig, paper_sizes  # noqa: E402
from msun.evaluate import evaluate_checkpoints, load_for_eval  # noqa: E402
from msun.splits import split_candidates  # noqa: E402

ARCH = "resnet18"
SPLITS = ("layer1", "layer2", "layer3", "layer4")
# name -> (method, split, SI options, label). The revised SI term: each smaller path against
# the largest, weight 0.1, no dead zone (MSUN_SPEC.md).
METHODS: dict[str, tuple[str, str | None, dict[str, Any], str]] = {
    "vanilla": ("vanilla", None, {}, "vanilla"),
    "mst": ("mst", None, {}, "MST"),
    "msun": ("msun", "layer2", {}, "MSUN, published SI (λ 1, all pairs)"),
    "msun_rev": (
        "msun",
        "layer2",
        {"si_weight": 0.1, "si_pairs": "largest", "si_threshold": 0.0},
        "MSUN, revised SI (λ 0.1 vs largest)",
    ),
}
# Pre-registered criteria (figures/README.md): "far above" at the smallest size is >= 10 points
# (the paper: +42 at 32 px); "within 1 point" at full size (the paper: 0.1-0.7 below).
FAR_ABOVE, WITHIN = 10.0, 1.0


def settings(quick: bool, data: str) -> dict[str, Any]:
    """The study's settings (or a smoke run's)."""
    common = {"data": data, "image_size": 28, "scales": [4, 16, 28], "crop_scale_min": 0.35}
    if quick:
        return {
            **common,
            "num_train": 64,
            "num_val": 16,
            "num_eval": 32,
            "epochs": 1,
            "batch_size": 16,
            "seeds": [0, 1],
            "cka_images": 32,
            "cka_repeats": 2,
            "cka_batch": 16,
        }
    return {
        **common,
        "num_train": 60000,
        "num_val": 500,
        "num_eval": 5000,
        "epochs": 1,
        "batch_size": 64,
        "seeds": [0, 1, 2],
        "cka_images": 1280,
        "cka_repeats": 10,
        "cka_batch": 128,
    }


def train_config(s: dict[str, Any], name: str, seed: int, out: Path, **change: Any) -> TrainConfig:
    """One run: ``name``'s method on the shared budget; ``change`` overrides (split, auto)."""
    method, split, si, _ = METHODS[name]
    options: dict[str, Any] = {"split_at": split, **si, **change}
    return TrainConfig(
        model=ARCH,
        method=method,
        scales=tuple(s["scales"]),
        data=s["data"],
        out=str(out),
        **budget(s),
        warmup_epochs=s["epochs"] * 5 / 90,  # the recipe's 5 of 90 epochs
        crop_scale_min=s["crop_scale_min"],
        eval_every=s["epochs"],
        seed=seed,
        **options,
    )


# ----------------------------------------------------------------------------- evaluation


def read_json(path: Path) -> Any:
    """A JSON file's content."""
    return json.loads(path.read_text())


def eval_loader(s: dict[str, Any]) -> DataLoader[Any]:
    """The same ``num_eval`` random test images for every model, at the native size."""
    size = s["image_size"]
    data = build_dataset(s["data"], "val", eval_transform(size, size))
    keep = subset_indices(dataset_len(data), min(s["num_eval"], dataset_len(data)), 0)
    return DataLoader(data, batch_sampler=plan_batches(keep, 250), collate_fn=collate_skip)


def evaluated(last: Path, s: dict[str, Any], cache: Path) -> dict[str, Any]:
    """``msun eval`` summary of one checkpoint (every path), cached beside the study's data."""
    config = read_checkpoint(last)["train_config"]
    saved: dict[str, Any] | None = read_json(cache) if cache.is_file() else None
    if saved is not None and saved["train_config"] == config:
        return saved
    (ev,) = evaluate_checkpoints(
        [load_for_eval(last)],
        eval_loader(s),
        paper_sizes(s["image_size"]),
        protocol="upsample",
        paths="all",
        device=torch.device("cpu"),
    )
    summary = {**ev.summary(), "train_config": config}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache, summary)
    return summary


def stats(values: Any) -> dict[str, Any]:
    """Mean and std (ddof 1) over seeds, along the first axis."""
    arr = np.asarray(values, dtype=float)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros_like(arr[0])
    return {"mean": arr.mean(axis=0).tolist(), "std": std.tolist()}


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Routed and best-path accuracy of one method over its seeds."""
    routed = np.array([s["top1"] for s in summaries])  # (seeds, sizes)
    per_path = np.array([s["top1_per_path"] for s in summaries], dtype=float)  # (seeds, S, P)
    best = np.nanmax(per_path, axis=2)
    return {
        "sizes": summaries[0]["sizes"],
        "seeds": len(summaries),
        "routed": stats(routed),
        "best_path": stats(best),
        "mean": stats(routed.mean(axis=1)),
        "best_path_mean": stats(best.mean(axis=1)),
        "smallest": stats(routed[:, 0]),
        "full": stats(routed[:, -1]),
        "mean_flops": summaries[0]["mean_flops"],
        "parameters": summaries[0]["parameters"],
    }


# ----------------------------------------------------------------------------- CKA and the loop


def cka(last: Path, s: dict[str, Any], folder: Path, kernel: Kernel) -> CKAResult:
    """Same-layer CKA of a trained model at its smallest vs its full size (reused when saved)."""
    if (folder / "result.json").is_file():
        return CKAResult.load(folder)
    result = compare_scales(
        load_checkpoint(last),
        s["data"],
        (min(s["scales"]), s["image_size"]),
        num_images=s["cka_images"],
        repeats=s["cka_repeats"],
        batch_size=s["cka_batch"],
        kernel=kernel,
        settings={"model": ARCH, "checkpoint": str(last)},
    )
    result.save(folder, overwrite=True)
    return result


def the_loop(s: dict[str, Any], data: Path, runs: Path, mains: dict[str, Path]) -> dict[str, Any]:
    """suggest-split on vanilla's analysis, ``--split-at auto`` from it, the split ablation."""
    analysis = data / "cka_vanilla"
    suggestion = suggest_split(CKAResult.load(analysis), split_candidates(ARCH, s["scales"]))
    cfg = train_config(s, "msun", 0, runs / "auto", split_at="auto", cka_from=str(analysis))
    auto = run(cfg)  # the library resolves auto to the run's own choice when reusing it
    chosen = str(read_checkpoint(auto)["train_config"]["split_at"])
    assert chosen == suggestion.choice, (chosen, suggestion.choice)
    checkpoints = {
        split: auto
        if split == chosen
        else mains["msun"]
        if split == "layer2"
        else run(train_config(s, "msun", 0, runs / f"ablation_{split}", split_at=split))
        for split in SPLITS
    }
    costs = {c.name: c.extra_params for c in split_candidates(ARCH, s["scales"])}
    rows = []
    for split, last in checkpoints.items():
        summary = evaluated(last, s, data / "eval" / f"ablation_{split}.json")
        rows.append({"split_at": split, "extra_params": costs[split], **summary})
    return {"suggestion": suggestion.to_dict(), "auto_split": chosen, "rows": rows}


# ----------------------------------------------------------------------------- the study


def study(s: dict[str, Any], out: Path, runs: Path) -> None:
    """Trains, evaluates and analyses everything missing; writes out/data."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    lasts: dict[str, list[Path]] = {name: [] for name in METHODS}
    for seed in s["seeds"]:  # seed by seed: a partial study is balanced over the methods
        for name in METHODS:
            lasts[name].append(run(train_config(s, name, seed, runs / f"{name}_seed{seed}")))
    accuracy = {
        name: aggregate(
            [
                evaluated(last, s, data / "eval" / f"{name}_seed{seed}.json")
                for seed, last in zip(s["seeds"], paths, strict=True)
            ]
        )
        for name, paths in lasts.items()
    }
    write_json(data / "accuracy.json", {"settings": s, "methods": accuracy})
    kernels: tuple[tuple[Kernel, str], ...] = (("linear", ""), ("rbf", "_rbf"))
    for name, paths in lasts.items():
        for kernel, suffix in kernels:
            cka(paths[0], s, data / f"cka_{name}{suffix}", kernel)
    loop = the_loop(s, data, runs, {name: paths[0] for name, paths in lasts.items()})
    write_json(data / "loop.json", {"settings": s, **loop})


def verdict(acc: dict[str, Any], msun: str) -> list[tuple[str, bool, str]]:
    """The pre-registered criteria for one MSUN variant: (criterion, met, evidence)."""

    def m(name: str, key: str) -> tuple[float, float]:
        return acc[name][key]["mean"], acc[name][key]["std"]

    (a, sa), (b, sb), (c, sc) = m(msun, "mean"), m("mst", "mean"), m("vanilla", "mean")
    small = m(msun, "smallest")[0] - m("vanilla", "smallest")[0]
    full = m("vanilla", "full")[0] - m(msun, "full")[0]
    spread = "beyond" if a - b > max(sa, sb) and b - c > max(sb, sc) else "not beyond"
    return [
        (
            "MSUN > MST > vanilla on the mean over sizes",
            a > b > c,
            f"{a:.2f} ± {sa:.2f} / {b:.2f} ± {sb:.2f} / {c:.2f} ± {sc:.2f} ({spread} the seed std)",
        ),
        (
            f"MSUN >= {FAR_ABOVE:g} points above vanilla at the smallest size",
            small >= FAR_ABOVE,
            f"{small:+.2f} points",
        ),
        (
            f"MSUN within {WITHIN:g} point of vanilla at full size",
            full <= WITHIN,
            f"vanilla - MSUN = {full:+.2f} points",
        ),
    ]


# ----------------------------------------------------------------------------- drawing


def accuracy_figure(acc: dict[str, Any]) -> Figure:
    """Routed top-1 vs test size, mean ± std over seeds; MSUN's best path per size dashed."""
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, a) in enumerate(acc.items()):
        mean, std = np.array(a["routed"]["mean"]), np.array(a["routed"]["std"])
        m, sd = a["mean"]["mean"], a["mean"]["std"]
        label = f"{METHODS[name][3]}: mean {m:.1f} ± {sd:.1f}%"
        ax.plot(a["sizes"], mean, marker="o", color=f"C{i}", label=label)
        ax.fill_between(a["sizes"], mean - std, mean + std, color=f"C{i}", alpha=0.2)
        if METHODS[name][0] == "msun":
            best = a["best_path"]["mean"]
            ax.plot(
                a["sizes"],
                best,
                ls="--",
                color=f"C{i}",
                alpha=0.7,
                label="  best path per size (chosen on the test set)",
            )
    ax.set_xticks(next(iter(acc.values()))["sizes"])
    ax.set_xlabel("test image size (px; trained at 28)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")  # never over the curves
    seeds = next(iter(acc.values()))["seeds"]
    ax.set_title(f"Fashion-MNIST, resnet18, routed top-1 (mean ± std over {seeds} seeds)")
    return fig


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pm(d: dict[str, Any], i: int | None = None) -> str:
    mean, std = (d["mean"], d["std"]) if i is None else (d["mean"][i], d["std"][i])
    return f"{mean:.2f} ± {std:.2f}"


def results_markdown(acc: dict[str, Any], loop: dict[str, Any], settings: dict[str, Any]) -> str:
    """Every table of the study, drawn from its data files only."""
    names = list(acc)
    sizes = acc[names[0]]["sizes"]
    lines = [
        "# Fashion-MNIST study: results (generated by figures/fashion_study.py from data/)",
        "",
        f"Top-1 (%) on {settings['num_eval']} test images, mean ± std over "
        f"{acc[names[0]]['seeds']} seeds; routed = routing fixed in advance.",
        "",
        _row(["size", *(METHODS[n][3] for n in names)]),
        _row(["---:"] * (len(names) + 1)),
    ]
    lines += [
        _row([str(size), *(_pm(acc[n]["routed"], i) for n in names)])
        for i, size in enumerate(sizes)
    ]
    lines += [
        _row(["**mean**", *(f"**{_pm(acc[n]['mean'])}**" for n in names)]),
        _row(["smallest", *(_pm(acc[n]["smallest"]) for n in names)]),
        _row(["full", *(_pm(acc[n]["full"]) for n in names)]),
        _row(
            [
                "best path per size, mean (chosen on the test set)",
                *(_pm(acc[n]["best_path_mean"]) if METHODS[n][0] == "msun" else "-" for n in names),
            ]
        ),
        _row(
            [
                "GFLOPs / image (mean over sizes)",
                *(f"{acc[n]['mean_flops'] / 1e9:.4f}" for n in names),
            ]
        ),
        _row(["parameters (M)", *(f"{acc[n]['parameters'] / 1e6:.3f}" for n in names)]),
        "",
        "## Verdict on the pre-registered criteria",
        "",
    ]
    for msun in (n for n in names if METHODS[n][0] == "msun"):
        lines += [
            f"**{METHODS[msun][3]}**",
            "",
            _row(["criterion", "met", "evidence"]),
            _row(["---"] * 3),
        ]
        lines += [_row([c, "yes" if ok else "**no**", e]) for c, ok, e in verdict(acc, msun)]
        lines.append("")
    lines += [
        "## The loop: suggest-split, --split-at auto, split-point ablation (seed 0, published SI)",
        "",
        f"suggest-split on the trained vanilla model: **{loop['suggestion']['choice']}**; "
        f"`msun train --split-at auto --cka-from` chose **{loop['auto_split']}**.",
        "",
        _row(["trunk starts at", "extra params (M)", "mean top-1", "smallest", "full", "GFLOPs"]),
        _row(["---"] + ["---:"] * 5),
    ]
    for r in loop["rows"]:
        mark = " (suggested)" if r["split_at"] == loop["suggestion"]["choice"] else ""
        lines.append(
            _row(
                [
                    r["split_at"] + mark,
                    f"{r['extra_params'] / 1e6:.3f}",
                    f"{r['mean_top1']:.2f}",
                    f"{r['top1'][0]:.2f}",
                    f"{r['top1'][-1]:.2f}",
                    f"{r['mean_flops'] / 1e9:.4f}",
                ]
            )
        )
    best = max(loop["rows"], key=lambda r: r["mean_top1"])["split_at"]
    lines += ["", f"Best split on the mean: **{best}** (one seed each)."]
    return "\n".join(lines) + "\n"


def redraw(out: Path) -> None:
    """Every figure and RESULTS.md from ``out/data`` (no model needed)."""
    data = out / "data"
    saved, loop = read_json(data / "accuracy.json"), read_json(data / "loop.json")
    acc = saved["methods"]
    png(accuracy_figure(acc), out, "accuracy_vs_size")
    labels = [METHODS[n][3] for n in acc]
    for suffix in ("", "_rbf"):
        results = [CKAResult.load(data / f"cka_{n}{suffix}") for n in acc]
        png(curve(results, labels=labels), out, f"fig2_cross_scale_cka{suffix}")
    for n in acc:
        png(
            heatmap(CKAResult.load(data / f"cka_{n}"), title=f"{METHODS[n][3]}, resnet18"),
            out,
            f"heatmap_{n}",
        )
    title = "Split ablation (Fashion-MNIST, published SI, seed 0)"
    png(ablation_figure(loop["rows"], loop["suggestion"]["choice"], title), out, "ablation_split")
    write_text(out / "RESULTS.md", results_markdown(acc, loop, saved["settings"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke settings")
    parser.add_argument("--redraw", action="store_true", help="only redraw from <out>/data")
    parser.add_argument("--data", default="fashionmnist", help="fashionmnist or fashionmnist:DIR")
    parser.add_argument("--runs", type=Path, default=Path("runs/fashion"))
    parser.add_argument("--out", type=Path, default=HERE / "fashion")
    args = parser.parse_args()
    if not args.redraw:
        study(settings(args.quick, args.data), args.out, args.runs)
    redraw(args.out)
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
