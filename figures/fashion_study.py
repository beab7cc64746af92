"""The paper's claims and the project's loop on real images: a converged, multi-seed study.

    python figures/fashion_study.py                 # run what is missing (hours on 2 CPU cores), resumable
    python figures/fashion_study.py --status        # what is done and what is left; runs nothing
    python figures/fashion_study.py --budget-only   # the probe and the budget, to commit first
    python figures/fashion_study.py --redraw        # summaries, figures and RESULTS.md from the records
    python figures/fashion_study.py --quick --data fashionmnist:DIR --out /tmp/fq --runs /tmp/fq/runs

The paper's geometry scaled to the data: ResNet-18 from scratch on the native 28-px images,
nominal scales 4 / 16 / 28 (the paper's 32 / 128 / 224 times 1/8: the same 1 : 4 : 7 ratios),
the 13 test sizes 4, 6, ..., 28 (1/7 .. 1 of the training size, as 32..224). Every run trains
with the same data, budget, optimiser and schedule; only what defines the method differs.

The study, in the order it runs (figures/README.md states the design and the criteria, written
before the runs):

1. **The budget, measured.** One vanilla run (seed 0) for 15 epochs, validated after every
   epoch; the budget E is the smallest epoch count whose full-size accuracy is within
   ``WITHIN_PLATEAU`` points of the plateau, kept in 3..6 (``choose_budget``). Written to
   data/budget.json before any other run starts.
2. **The methods at E epochs, seed by seed:** vanilla, MST, MSUN with the published SI term and
   with the revised one, each evaluated on the same test images at the 13 sizes.
3. **The loop:** suggest-split on each seed's vanilla model (``--split-at auto``'s own choice,
   made by the trainer's code), and the split ablation: MSUN (published SI) with its trunk at
   layer1..layer4, every seed (layer2 is step 2's MSUN).
4. **Figure 2 and heatmaps** from the seed-0 models (linear and RBF CKA).

Every finished run writes its record (resolved config, training curve, evaluation) and its CKA
analyses into ``<out>/data`` at once, so a study stopped anywhere loses at most the run in
progress: the next invocation skips every run with a record, resumes a run whose checkpoint
(under ``--runs``, outside the work tree) is still there, and starts the others afresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make_figures, beside this script

from make_figures import png  # noqa: E402
from make_figures import run as trained  # noqa: E402

from ckascope.platform import (  # noqa: E402
    CKAResult,
    CKAScopeError,
    Kernel,
    build_dataset,
    collate_skip,
    compare_scales,
    curve,
    dataset_len,
    eval_transform,
    heatmap,
    init_distributed,
    load_checkpoint,
    plan_batches,
    read_checkpoint,
    subset_indices,
    suggest_split,
    write_json,
    write_text,
)
from msun.config import WEIGHT_NEUTRAL, TrainConfig, paper_sizes, saved_value  # noqa: E402
from msun.evaluate import evaluate_checkpoints, load_for_eval, recalibration_set  # noqa: E402
from msun.splits import choose, split_candidates  # noqa: E402

ARCH = "resnet18"
SPLITS = ("layer1", "layer2", "layer3", "layer4")
# name -> (method, split, SI options, label). The revised SI term: each smaller path against
# the largest, weight 0.1, no dead zone (figures/README.md, "Design").
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
    # The rivals (figures/README.md, design item 5): RS-Nets-style MST, MSUN's private-BN trunk.
    "mst_pbn": ("mst", None, {"bn": "private", "distill": True}, "MST + private BN + distillation"),
    "msun_pbn": ("msun", "layer2", {"bn": "private"}, "MSUN, published SI, private-BN trunk"),
}
# Pre-registered (figures/README.md). The paper's claims: "far above" at the smallest size is
# >= 10 points (the paper: +42 at 32 px), "within 1 point" at full size (the paper: 0.1-0.7).
FAR_ABOVE, WITHIN = 10.0, 1.0
# The budget: E is the smallest epoch count whose full-size accuracy in the probe is within
# WITHIN_PLATEAU points of the plateau (the mean of its last PLATEAU_EPOCHS epochs), kept in
# the settings' [min_epochs, max_epochs] (3..6 for the study).
PLATEAU_EPOCHS, WITHIN_PLATEAU = 3, 1.5
DEFAULT_RUNS = Path.home() / ".cache" / "ckascope" / "fashion-study"


def settings(quick: bool, data: str) -> dict[str, Any]:
    """The study's settings (or a smoke run's); the epochs come from the probe."""
    common = {"data": data, "image_size": 28, "scales": [4, 16, 28], "crop_scale_min": 0.35}
    if quick:
        return {
            **common,
            "num_train": 64,
            "num_val": 16,
            "num_eval": 32,
            "batch_size": 16,
            "seeds": [0, 1],
            "probe_epochs": 2,
            "probe_val": 32,
            "min_epochs": 1,
            "max_epochs": 1,
            "cka_images": 32,
            "recalibrate_images": 16,
            "recalibrate_batch": 8,
            "cka_repeats": 2,
            "cka_batch": 16,
            "cka_bootstrap": 100,
            "cka_permutations": 5,
        }
    return {
        **common,
        "num_train": 60000,
        "num_val": 500,
        "num_eval": 5000,
        "batch_size": 64,
        "seeds": [0, 1, 2],
        "probe_epochs": 15,
        "probe_val": 5000,
        "min_epochs": 3,
        "max_epochs": 6,
        "cka_images": 1280,
        "recalibrate_images": 1024,
        "recalibrate_batch": 256,
        "cka_repeats": 10,
        "cka_batch": 128,
        "cka_bootstrap": 1000,
        "cka_permutations": 20,
    }


# ----------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    """One training run of the study and the analyses made of its checkpoint.

    Attributes:
        name: The run's file stem in data/ and folder under --runs ("msun_seed1").
        config: What it trains.
        kernels: The CKA analyses of the trained model (smallest vs full size).
    """

    name: str
    config: TrainConfig
    kernels: tuple[Kernel, ...] = ()


def train_config(
    s: dict[str, Any], name: str, seed: int, epochs: int, out: Path, **change: Any
) -> TrainConfig:
    """``name``'s method on the shared budget of ``epochs`` epochs; ``change`` overrides."""
    method, split, si, _ = METHODS[name]
    options: dict[str, Any] = {"split_at": split, **si, **change}
    return TrainConfig(
        model=ARCH,
        method=method,
        scales=tuple(s["scales"]),
        data=s["data"],
        out=str(out),
        image_size=s["image_size"],
        num_train=s["num_train"],
        num_val=s["num_val"],
        batch_size=s["batch_size"],
        epochs=epochs,
        warmup_epochs=epochs * 5 / 90,  # the recipe's 5 of 90 epochs
        crop_scale_min=s["crop_scale_min"],
        eval_every=epochs,
        seed=seed,
        **options,
    )


def probe_run(s: dict[str, Any], runs: Path) -> Run:
    """Vanilla, seed 0, ``probe_epochs`` epochs, validated after each on ``probe_val`` images."""
    epochs = s["probe_epochs"]
    name = f"probe_vanilla_seed0_{epochs}ep"
    cfg = train_config(s, "vanilla", 0, epochs, runs / name)
    return Run(name, dataclasses.replace(cfg, num_val=s["probe_val"], eval_every=1))


def study_runs(s: dict[str, Any], epochs: int, runs: Path) -> list[Run]:
    """Every run at the budget, in the order they train: methods seed by seed, then the ablation.

    Seed by seed, so a partial study is balanced over the methods. Each vanilla model gets the
    linear analysis suggest-split reads; the seed-0 models of every method both kernels.
    """
    out = []
    for seed in s["seeds"]:
        for name in METHODS:
            first, vanilla = seed == s["seeds"][0], name == "vanilla"
            kernels: tuple[Kernel, ...] = (
                ("linear", "rbf") if first else ("linear",) if vanilla else ()
            )
            run_name = f"{name}_seed{seed}"
            out.append(Run(run_name, train_config(s, name, seed, epochs, runs / run_name), kernels))
    for seed in s["seeds"]:
        for split in SPLITS:
            if split != METHODS["msun"][1]:  # layer2 is the main MSUN run
                run_name = f"ablation_{split}_seed{seed}"
                cfg = train_config(s, "msun", seed, epochs, runs / run_name, split_at=split)
                out.append(Run(run_name, cfg))
    return out


def ablation_runs(s: dict[str, Any], split: str) -> list[str]:
    """The runs that give ``split``'s ablation point, one per seed."""
    main = split == METHODS["msun"][1]
    return [f"msun_seed{seed}" if main else f"ablation_{split}_seed{seed}" for seed in s["seeds"]]


# ----------------------------------------------------------------------------- one run's data


def read_json(path: Path) -> Any:
    """A JSON file's content."""
    return json.loads(path.read_text())


def record_path(data: Path, run: Run) -> Path:
    return data / "runs" / f"{run.name}.json"


def cka_folder(data: Path, run: Run, kernel: Kernel) -> Path:
    return data / "cka" / (run.name + ("_rbf" if kernel == "rbf" else ""))


def matches(saved: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a saved resolved config is what ``cfg`` asks for.

    Every value ``cfg`` fixes must be the saved one; None and "auto" mean "resolve it" (the lr,
    the clip, amp) and settings that do not change the weights (``WEIGHT_NEUTRAL``) may differ.
    """
    wanted = cfg.to_dict().items()
    fixed = {k: v for k, v in wanted if v not in (None, "auto") and k not in WEIGHT_NEUTRAL}
    return all(saved_value(saved, k) == v for k, v in fixed.items())


def has_record(data: Path, run: Run) -> bool:
    """A record of this run (its config, curve and evaluation) is in ``data``."""
    record = record_path(data, run)
    return record.is_file() and matches(read_json(record)["train_config"], run.config)


def has_cka(data: Path, run: Run, kernel: Kernel, s: dict[str, Any]) -> bool:
    """The run's analysis with this kernel is in ``data``: of this run's model, as planned.

    The analysis records the trained model's config and the sweep it made (images, sweeps,
    batch, calibration; ``bootstrap_draws`` marks the current bootstrap), all compared.
    """
    path = cka_folder(data, run, kernel) / "result.json"
    if not path.is_file():
        return False
    saved = read_json(path)["settings"]
    wanted = {
        "bootstrap": s["cka_bootstrap"],
        "permutations": s["cka_permutations"],
        "num_images": s["cka_images"],
        "repeats": s["cka_repeats"],
        "batch_size": s["cka_batch"],
    }
    made = isinstance(saved.get("train_config"), dict) and "bootstrap_draws" in saved
    same = all(saved.get(k) == v for k, v in wanted.items())
    return made and same and matches(saved["train_config"], run.config)


def has_recalibrated(data: Path, run: Run, s: dict[str, Any]) -> bool:
    """The run's record holds its evaluation with BatchNorm recalibrated as planned."""
    if run.name.startswith("probe_"):  # the budget probe is not a model of the study
        return True
    scored = read_json(record_path(data, run)).get("evaluation_recalibrated")
    return (
        scored is not None
        and scored["recalibrate_bn"] == s["recalibrate_images"]
        and scored.get("recalibrate_batch") == s["recalibrate_batch"]  # image-weighted batches
    )


def is_done(data: Path, run: Run, s: dict[str, Any]) -> bool:
    """A record of this run (both evaluations) and every analysis of it are in ``data``."""
    return (
        has_record(data, run)
        and has_recalibrated(data, run, s)
        and all(has_cka(data, run, k, s) for k in run.kernels)
    )


def eval_loader(s: dict[str, Any]) -> DataLoader[Any]:
    """The same ``num_eval`` random test images for every model, at the native size."""
    size = s["image_size"]
    data = build_dataset(s["data"], "val", eval_transform(size, size))
    keep = subset_indices(dataset_len(data), min(s["num_eval"], dataset_len(data)), 0)
    return DataLoader(data, batch_sampler=plan_batches(keep, 250), collate_fn=collate_skip)


def evaluation(last: Path, s: dict[str, Any], *, recalibrate: bool = False) -> dict[str, Any]:
    """``msun eval`` of one checkpoint on the study's test images at every size.

    Every path as trained; with ``recalibrate``, the routed path after its BatchNorm statistics
    are re-estimated on ``recalibrate_images`` training images at each size (the seed's draw).
    """
    loaded = load_for_eval(last)
    recalibration = (
        recalibration_set(
            s["data"], s["image_size"], s["recalibrate_images"], s["recalibrate_batch"], loaded.seed
        )
        if recalibrate
        else None
    )
    (ev,) = evaluate_checkpoints(
        [loaded],
        eval_loader(s),
        paper_sizes(s["image_size"]),
        protocol="upsample",
        paths="routed" if recalibrate else "all",
        device=torch.device("cpu"),
        memory_format="contiguous",  # the layout every run of the study was scored in
        recalibration=recalibration,
        data=s["data"],
        image_size=s["image_size"],
    )
    # the checkpoint's file is on the machine that trained it, not in the committed data
    return {k: v for k, v in ev.summary().items() if k != "checkpoint_path"}


def cka(last: Path, s: dict[str, Any], kernel: Kernel) -> CKAResult:
    """Same-layer CKA of a trained model at its smallest vs its full size."""
    return compare_scales(
        load_checkpoint(last),
        s["data"],
        (min(s["scales"]), s["image_size"]),
        num_images=s["cka_images"],
        repeats=s["cka_repeats"],
        batch_size=s["cka_batch"],
        kernel=kernel,
        bootstrap=s["cka_bootstrap"],
        permutations=s["cka_permutations"],
        memory_format="contiguous",  # as every run of the study
        settings={
            "model": ARCH,
            "arch": ARCH,
            "train_config": read_checkpoint(last)["train_config"],
        },
    )


def finish(run: Run, s: dict[str, Any], data: Path) -> None:
    """Trains (or resumes, or reuses) the run, then writes what of its data is missing.

    The analyses come first and the record last: a run with a record has all of its data (an
    analysis made with other calibration settings is made again while its checkpoint exists).
    """
    if has_record(data, run) and not (Path(run.config.out) / "last.pt").is_file():
        print(f"fashion study: {run.name}'s checkpoint is gone; its data stay as they are")
        return
    if not (Path(run.config.out) / "last.pt").is_file():  # a model made anew: its analyses too
        for kernel in run.kernels:
            shutil.rmtree(cka_folder(data, run, kernel), ignore_errors=True)
    last = trained(run.config)
    for kernel in run.kernels:
        if not has_cka(data, run, kernel, s):
            cka(last, s, kernel).save(cka_folder(data, run, kernel), overwrite=True)
    path = record_path(data, run)
    if has_record(data, run):  # a record made before the recalibrated scores: add them
        if not has_recalibrated(data, run, s):
            record = read_json(path)
            write_json(
                path, {**record, "evaluation_recalibrated": evaluation(last, s, recalibrate=True)}
            )
        return
    ckpt = read_checkpoint(last)
    probe = run.name.startswith("probe_")
    record = {
        "train_config": ckpt["train_config"],
        "history": ckpt["history"],
        "evaluation": None if probe else evaluation(last, s),
        "evaluation_recalibrated": None if probe else evaluation(last, s, recalibrate=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)


# ----------------------------------------------------------------------------- the budget


def probe_curve(history: list[dict[str, Any]], image_size: int) -> list[dict[str, Any]]:
    """Per epoch of the probe: full-size and mean validation top-1, training loss."""
    return [
        {
            "epoch": row["epoch"],
            "top1_full": row[f"val_top1_{image_size}"],
            "top1_mean": row["val_top1_mean"],
            "loss": row["loss"],
        }
        for row in history
    ]


def choose_budget(full: Sequence[float], low: int, high: int) -> dict[str, Any]:
    """The pre-registered rule on the probe's full-size top-1 per epoch (index 0 = epoch 1).

    Returns:
        The plateau, the first epoch within ``WITHIN_PLATEAU`` points of it, the budget (that
        epoch kept in [low, high]) and the rule in words.
    """
    plateau = float(np.mean(full[-PLATEAU_EPOCHS:]))
    reached = next(e for e, acc in enumerate(full, 1) if acc >= plateau - WITHIN_PLATEAU)
    return {
        "plateau": plateau,
        "first_within": reached,
        "epochs": min(max(reached, low), high),
        "rule": (
            f"the smallest epoch count whose full-size top-1 is within {WITHIN_PLATEAU} points of "
            f"the plateau (mean of the probe's last {PLATEAU_EPOCHS} epochs), kept in "
            f"[{low}, {high}]"
        ),
    }


def budget(s: dict[str, Any], data: Path, runs: Path, train: bool) -> int | None:
    """The study's epochs: from data/budget.json, else from the probe (trained when ``train``)."""
    path = data / "budget.json"
    if path.is_file():
        return int(read_json(path)["epochs"])
    probe = probe_run(s, runs)
    if not is_done(data, probe, s):
        if not train:
            return None
        finish(probe, s, data)
    history = read_json(record_path(data, probe))["history"]
    points = probe_curve(history, s["image_size"])
    choice = choose_budget([p["top1_full"] for p in points], s["min_epochs"], s["max_epochs"])
    write_json(
        path, {"probe": probe.name, "validation_images": s["probe_val"], "curve": points, **choice}
    )
    return int(choice["epochs"])


# ----------------------------------------------------------------------------- the study


def status(s: dict[str, Any], data: Path, runs: Path) -> list[str]:
    """One line per run: done (its data is in ``data``), interrupted (and where), or to do."""
    epochs = budget(s, data, runs, train=False)
    planned = [probe_run(s, runs)] if epochs is None else study_runs(s, epochs, runs)
    lines = [line(run, data, s) for run in planned]
    done = sum(x.startswith("done") for x in lines)
    head = f"{done} of {len(planned)} runs done" + (
        "" if epochs is not None else " (the probe decides the budget; the other runs follow)"
    )
    return [head, *lines]


def line(run: Run, data: Path, s: dict[str, Any]) -> str:
    if is_done(data, run, s):
        return f"done         {run.name}"
    if has_record(data, run) and not (Path(run.config.out) / "last.pt").is_file():
        return f"incomplete   {run.name} (its checkpoint is gone: what it lacks cannot be made)"
    if has_record(data, run):
        return f"to do        {run.name} (its analyses or recalibrated scores: missing or made otherwise)"
    last = Path(run.config.out) / "last.pt"
    if last.is_file():
        epoch = read_checkpoint(last)["progress"]["epoch"]
        return f"interrupted  {run.name} (checkpoint after epoch {epoch}/{run.config.epochs})"
    return f"to do        {run.name}"


def study(s: dict[str, Any], out: Path, runs: Path) -> None:
    """Runs everything missing, each finished run's data written at once; then the summaries."""
    data = out / "data"
    epochs = budget(s, data, runs, train=True)
    assert epochs is not None
    for run in study_runs(s, epochs, runs):
        if not is_done(data, run, s):
            print(f"fashion study: {run.name}", flush=True)
            finish(run, s, data)
    summarize(s, epochs, data, runs)


def suggestions(s: dict[str, Any], data: Path, runs: Path, epochs: int) -> list[dict[str, Any]]:
    """Per seed: suggest-split on that seed's vanilla model, and ``--split-at auto``'s choice.

    The auto choice is made by the trainer's own code (``msun.splits.choose`` with
    ``--cka-from``), into a scratch folder: it must agree with suggest-split.
    """
    rows = []
    candidates = split_candidates(ARCH, s["scales"])
    info = init_distributed("cpu")
    for seed in s["seeds"]:
        analysis = data / "cka" / f"vanilla_seed{seed}"
        suggestion = suggest_split(CKAResult.load(analysis), candidates)
        with tempfile.TemporaryDirectory() as scratch:
            cfg = train_config(s, "msun", seed, epochs, Path(scratch), split_at="auto")
            auto = choose(dataclasses.replace(cfg, cka_from=str(analysis)), None, info)
        rows.append({"seed": seed, "auto_split": auto, **suggestion.to_dict()})
    return rows


def summarize(s: dict[str, Any], epochs: int, data: Path, runs: Path) -> None:
    """accuracy.json and loop.json from the records there are (a partial study says so)."""
    plan = plan_of(s, epochs, runs)
    by_method = {name: [plan[f"{name}_seed{seed}"] for seed in s["seeds"]] for name in METHODS}
    recalibrated = {name: recalibrated_runs(data, rs, s) for name, rs in by_method.items()}
    evals = {name: records(data, rs) for name, rs in by_method.items()}
    recal = {
        name: records(data, rs, "evaluation_recalibrated") for name, rs in recalibrated.items()
    }
    paired = {name: records(data, rs) for name, rs in recalibrated.items()}  # the same runs
    ablation = {split: ablation_point(s, data, split, plan) for split in SPLITS}
    seeds = [seed for seed in s["seeds"] if has_cka(data, plan[f"vanilla_seed{seed}"], "linear", s)]
    loop = suggestions({**s, "seeds": seeds}, data, runs, epochs)
    planned = len(plan)
    done = sum(is_done(data, r, s) for r in plan.values())
    write_json(
        data / "accuracy.json",
        {
            "settings": {**s, "epochs": epochs},
            "runs_done": done,
            "runs_planned": planned,
            "methods": {name: aggregate(e) for name, e in evals.items() if e},
            "recalibrated": {name: aggregate(e) for name, e in recal.items() if e},
            "recalibrated_as_trained": {name: aggregate(e) for name, e in paired.items() if e},
            "ablation": {split: a for split, a in ablation.items() if a is not None},
            "suggested": {str(r["seed"]): r["choice"] for r in loop},
        },
    )
    complete = all(a is not None and a["seeds"] == len(s["seeds"]) for a in ablation.values())
    verdict = loop_verdict(ablation, loop) if complete and loop else None
    write_json(data / "loop.json", {"seeds": loop, "verdict": verdict})


def plan_of(s: dict[str, Any], epochs: int, runs: Path = DEFAULT_RUNS) -> dict[str, Run]:
    """The study's runs at ``epochs`` epochs, by name."""
    return {run.name: run for run in study_runs(s, epochs, runs)}


def records(data: Path, runs: list[Run], key: str = "evaluation") -> list[dict[str, Any]]:
    """The evaluations (``key``) of the runs whose record is there, made as planned, with one."""
    found = [read_json(record_path(data, r)).get(key) for r in runs if has_record(data, r)]
    return [e for e in found if e is not None]


def recalibrated_runs(data: Path, runs: list[Run], s: dict[str, Any]) -> list[Run]:
    """The runs whose recalibrated scores are made as planned (a run whose checkpoint went
    keeps older ones, which are not counted)."""
    return [r for r in runs if has_record(data, r) and has_recalibrated(data, r, s)]


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


def _gap_change(msun: dict[str, Any], pbn: dict[str, Any], full: float) -> str:
    """What a private-BN trunk does to the published MSUN's full-size gap, in words.

    Args:
        msun, pbn: The published MSUN's and the private-BN trunk's aggregates.
        full: Vanilla's mean top-1 at full size.
    """
    (a, sa), (b, sb) = _at(msun, "full"), _at(pbn, "full")
    published, change = full - a, b - a  # the gap before; how much of it the trunk closes
    if published <= 0:
        return f"; the published MSUN is not below vanilla at full size ({-published:+.2f})"
    if min(msun["seeds"], pbn["seeds"]) < 2:
        spread = "one seed: its spread is not known yet"
    else:
        spread = f"{'beyond' if abs(change) > max(sa, sb) else 'within'} the larger seed std"
    if change < 0:
        return f"; it widens the published MSUN's {published:+.2f}-point gap by {-change:.2f} ({spread})"
    return (
        f"; it removes {change:.2f} of the published MSUN's {published:+.2f}-point gap "
        f"({100 * change / published:.0f} %; {spread})"
    )


def ablation_point(
    s: dict[str, Any], data: Path, split: str, plan: dict[str, Run]
) -> dict[str, Any] | None:
    """One split's routed mean accuracy per seed and over seeds, with its cost (None: no run)."""
    evals = records(data, [plan[name] for name in ablation_runs(s, split)])
    if not evals:
        return None
    per_seed = [e["mean_top1"] for e in evals]
    extra = {c.name: c.extra_params for c in split_candidates(ARCH, s["scales"])}[split]
    return {
        "seeds": len(per_seed),
        "per_seed": per_seed,
        **stats(per_seed),
        "parameters": evals[0]["parameters"],
        "extra_params": extra,
        "gflops": evals[0]["mean_flops"] / 1e9,
    }


def suggested_split(loop: list[dict[str, Any]]) -> str:
    """suggest-split's choice on the most seeds, the earliest split on a tie."""
    choices = [r["choice"] for r in loop]
    return max(SPLITS, key=lambda x: (choices.count(x), -SPLITS.index(x)))


def loop_verdict(ablation: dict[str, Any], loop: list[dict[str, Any]]) -> dict[str, Any]:
    """The loop's pre-registered criterion.

    The suggested split (suggest-split's choice on the most seeds, the earliest on a tie) is
    right when its mean accuracy is within one pooled seed-std (root mean of the splits'
    variances) of the best split's.
    """
    choices = [r["choice"] for r in loop]
    suggested = suggested_split(loop)
    best = max(SPLITS, key=lambda x: ablation[x]["mean"])
    pooled = math.sqrt(float(np.mean([ablation[x]["std"] ** 2 for x in SPLITS])))
    gap = ablation[best]["mean"] - ablation[suggested]["mean"]
    return {
        "suggested": suggested,
        "same_on_every_seed": len(set(choices)) == 1,
        "best": best,
        "pooled_std": pooled,
        "gap_to_best": gap,
        "right": gap <= pooled,
    }


def provisional(acc: dict[str, Any], msun: str, planned: int) -> str:
    """ " (provisional: k of n seeds)" while a method the criteria compare lacks seeds, else ""."""
    fewest = min(acc[n]["seeds"] for n in (msun, "mst", "vanilla"))
    return f" (provisional: {fewest} of {planned} seeds)" if fewest < planned else ""


def verdict(acc: dict[str, Any], msun: str) -> list[tuple[str, bool, str]]:
    """The paper's pre-registered criteria for one MSUN variant: (criterion, met, evidence)."""

    def m(name: str, key: str) -> tuple[float, float]:
        return acc[name][key]["mean"], acc[name][key]["std"]

    a, b, c = (m(n, "mean")[0] for n in (msun, "mst", "vanilla"))
    small = m(msun, "smallest")[0] - m("vanilla", "smallest")[0]
    full = m("vanilla", "full")[0] - m(msun, "full")[0]
    seeds = {n: acc[n]["seeds"] for n in (msun, "mst", "vanilla")}

    def beyond(x: str, y: str) -> bool:
        (mx, sx), (my, sy) = m(x, "mean"), m(y, "mean")
        return min(seeds[x], seeds[y]) >= 2 and abs(mx - my) > max(sx, sy)

    def gap(x: str, y: str) -> str:
        d = m(x, "mean")[0] - m(y, "mean")[0]
        if min(seeds[x], seeds[y]) < 2:
            return f"{d:+.2f} (one seed: its spread is not known yet)"
        return f"{d:+.2f} ({'beyond' if beyond(x, y) else 'within'} the larger seed std)"

    pairs = ((msun, "mst"), ("mst", "vanilla"))
    # the criterion is the order of the means, as registered; its evidence says how firm it is
    unresolved = a > b > c and not all(beyond(x, y) for x, y in pairs)
    return [
        (
            "MSUN > MST > vanilla on the mean over sizes",
            a > b > c,
            " / ".join(
                f"{m(n, 'mean')[0]:.2f}" + ("" if k < 2 else f" ± {m(n, 'mean')[1]:.2f}")
                for n, k in seeds.items()
            )
            + "; MSUN - MST "
            f"{gap(msun, 'mst')}, MST - vanilla {gap('mst', 'vanilla')}"
            + (
                "; met on the means only: a gap within the seed std leaves that order open"
                if unresolved
                else ""
            ),
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


def rival_verdict(acc: dict[str, Any], recal: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Criteria 5 and 6 (figures/README.md), on the seed means; a criterion without its runs
    is left out."""
    out = []
    if "msun" in acc and "vanilla" in recal:
        (a, sa), (b, sb) = _at(acc["msun"], "smallest"), _at(recal["vanilla"], "smallest")
        rivals = ", ".join(
            f"vs {label} {a - _at(table[n], 'smallest')[0]:+.2f}"
            for n, table, label in (
                ("mst_pbn", acc, "MST + private BN"),
                ("mst_pbn", recal, "MST + private BN recalibrated"),
            )
            if n in table
        )
        out.append(
            (
                "MSUN beats vanilla with BN recalibration at the smallest size",
                a - b > 0 and a - b > max(sa, sb),
                f"{a:.2f} vs {b:.2f}: {a - b:+.2f} ("
                + (
                    "one seed: its spread is not known yet"
                    if min(acc["msun"]["seeds"], recal["vanilla"]["seeds"]) < 2
                    else f"larger seed std {max(sa, sb):.2f}"
                )
                + ")"
                + (f"; {rivals}" if rivals else ""),
            )
        )
    if "msun_pbn" in acc and "vanilla" in acc:
        full = _at(acc["vanilla"], "full")[0]
        gap = full - _at(acc["msun_pbn"], "full")[0]
        before = _gap_change(acc["msun"], acc["msun_pbn"], full) if "msun" in acc else ""
        out.append(
            (
                f"A private-BN trunk brings MSUN within {WITHIN:g} point of vanilla at full size",
                gap <= WITHIN,
                f"vanilla - MSUN + private-BN trunk = {gap:+.2f} points{before}",
            )
        )
    return out


def _at(a: dict[str, Any], key: str) -> tuple[float, float]:
    return a[key]["mean"], a[key]["std"]


# ----------------------------------------------------------------------------- drawing


def accuracy_figure(acc: dict[str, Any], recal: dict[str, Any], epochs: int) -> Figure:
    """Routed top-1 vs test size, mean ± std over seeds: as trained (MSUN's best path per size
    dashed) and, beside it, with BatchNorm recalibrated at each size."""
    panels = [(acc, "as trained")] + (
        [(recal, "BatchNorm recalibrated at each size")] if recal else []
    )
    fig = Figure(figsize=(8 * len(panels), 6.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = {name: f"C{i}" for i, name in enumerate(METHODS)}
    for ax, (table, what) in zip(axes, panels, strict=True):
        for name, a in table.items():
            _accuracy_curves(ax, name, a, colours[name], oracle=table is acc)
        ax.set_xticks(next(iter(table.values()))["sizes"])
        ax.set_xlabel("test image size (px; trained at 28)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_title(f"{what}: routed top-1 (mean ± std over seeds)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Fashion-MNIST, resnet18, {epochs} epochs")
    return fig


def _accuracy_curves(ax: Any, name: str, a: dict[str, Any], colour: str, *, oracle: bool) -> None:
    mean, std = np.array(a["routed"]["mean"]), np.array(a["routed"]["std"])
    m, sd = a["mean"]["mean"], a["mean"]["std"]
    spread = f" ± {sd:.1f}" if a["seeds"] > 1 else ""  # one seed has no spread
    label = f"{METHODS[name][3]}: mean {m:.1f}{spread}% ({_seeds(a['seeds'])})"
    ax.plot(a["sizes"], mean, marker="o", ms=4, color=colour, label=label)
    ax.fill_between(a["sizes"], mean - std, mean + std, color=colour, alpha=0.2)
    if oracle and METHODS[name][0] == "msun":
        label = "  best path per size (chosen on the test set)"
        ax.plot(a["sizes"], a["best_path"]["mean"], ls="--", color=colour, alpha=0.7, label=label)


def budget_figure(saved: dict[str, Any]) -> Figure:
    """The probe's validation top-1 per epoch, the plateau band and the chosen budget."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    epochs = [p["epoch"] for p in saved["curve"]]
    ax.plot(epochs, [p["top1_full"] for p in saved["curve"]], marker="o", label="28 px (full size)")
    ax.plot(
        epochs, [p["top1_mean"] for p in saved["curve"]], marker=".", label="mean over 13 sizes"
    )
    low = saved["plateau"] - WITHIN_PLATEAU
    label = f"within {WITHIN_PLATEAU:g} points of the plateau"
    ax.axhspan(low, saved["plateau"], color="grey", alpha=0.2, label=label)
    ax.axvline(saved["epochs"], color="C3", ls="--", label=f"budget E = {saved['epochs']}")
    ax.set_xlabel("epoch (one cosine schedule over all epochs)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"Budget probe: vanilla resnet18, seed 0, {saved['validation_images']} images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def ablation_figure(
    ablation: dict[str, Any], suggested: str | None, title: str, planned: int
) -> Figure:
    """Mean accuracy over the test sizes against the split point, ± seed std, choice ringed.

    A point with fewer than the ``planned`` seeds says how many it has.
    """
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    splits = list(ablation)
    means = [ablation[x]["mean"] for x in splits]
    ax.errorbar(splits, means, yerr=[ablation[x]["std"] for x in splits], marker="o", capsize=4)
    if suggested in splits:
        point = ([suggested], [means[splits.index(suggested)]])
        ax.scatter(
            *point, s=220, facecolors="none", edgecolors="C3", label=f"suggest-split: {suggested}"
        )
        ax.legend(loc="lower left", fontsize=8)
    for x, m in zip(splits, means, strict=True):
        seeds = ablation[x]["seeds"]
        text = f"{m:.1f}%\n+{ablation[x]['extra_params'] / 1e6:.2f} M" + (
            f"\n({_seeds(seeds)})" if seeds < planned else ""
        )
        # beside the point, so the label never crosses its error bar
        ax.annotate(
            text,
            (x, m),
            textcoords="offset points",
            xytext=(12, 0),
            va="center",
            fontsize=8,
            bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
        )
    ax.margins(x=0.25, y=0.3)
    ax.set_xlabel("the shared trunk starts at")
    ax.set_ylabel("mean top-1 over the 13 sizes (%)")
    ax.set_title(title, fontsize=9)
    return fig


# ----------------------------------------------------------------------------- RESULTS.md


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pm(d: dict[str, Any], i: int | None = None) -> str:
    """mean ± std; the mean alone for one seed (its std is 0 by definition, not a measurement)."""
    mean, std = (d["mean"], d["std"]) if i is None else (d["mean"][i], d["std"][i])
    return f"{mean:.2f} ± {std:.2f}" if std else f"{mean:.2f}"


def _seeds(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def budget_markdown(saved: dict[str, Any]) -> list[str]:
    return [
        "## The budget (chosen before the other runs)",
        "",
        f"Probe: vanilla, seed 0, {len(saved['curve'])} epochs (one cosine schedule), validation "
        f"top-1 on {saved['validation_images']} test images after every epoch.",
        "",
        _row(["epoch", *(str(p["epoch"]) for p in saved["curve"])]),
        _row(["---"] * (len(saved["curve"]) + 1)),
        _row(["28 px", *(f"{p['top1_full']:.2f}" for p in saved["curve"])]),
        _row(["mean, 13 sizes", *(f"{p['top1_mean']:.2f}" for p in saved["curve"])]),
        "",
        f"Plateau {saved['plateau']:.2f} %; first within {WITHIN_PLATEAU:g} points at epoch "
        f"{saved['first_within']}; rule: {saved['rule']}: **E = {saved['epochs']}**.",
        "",
    ]


def accuracy_markdown(acc: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    if not acc:
        return ["## Top-1 per test size", "", "No run is evaluated yet.", ""]
    names = list(acc)
    sizes = acc[names[0]]["sizes"]
    lines = [
        "## Top-1 per test size",
        "",
        f"Top-1 (%) on {settings['num_eval']} test images, mean ± std over seeds (seeds per "
        "method in the header); routed = routing fixed in advance.",
        "",
        _row(["size", *(f"{METHODS[n][3]} ({_seeds(acc[n]['seeds'])})" for n in names)]),
        _row(["---:"] * (len(names) + 1)),
    ]
    lines += [
        _row([str(size), *(_pm(acc[n]["routed"], i) for n in names)])
        for i, size in enumerate(sizes)
    ]
    oracle = [_pm(acc[n]["best_path_mean"]) if METHODS[n][0] == "msun" else "-" for n in names]
    lines += [
        _row(["**mean**", *(f"**{_pm(acc[n]['mean'])}**" for n in names)]),
        _row(["smallest", *(_pm(acc[n]["smallest"]) for n in names)]),
        _row(["full", *(_pm(acc[n]["full"]) for n in names)]),
        _row(["best path per size, mean (chosen on the test set)", *oracle]),
        _row(
            [
                "GFLOPs / image (mean over sizes)",
                *(f"{acc[n]['mean_flops'] / 1e9:.4f}" for n in names),
            ]
        ),
        _row(["parameters (M)", *(f"{acc[n]['parameters'] / 1e6:.3f}" for n in names)]),
        "",
    ]
    return lines


def recalibration_markdown(acc: dict[str, Any], recal: dict[str, Any], images: int) -> list[str]:
    """Each method as trained and with BatchNorm recalibrated at each size, side by side.

    ``acc`` holds the as-trained scores of the same runs (``recalibrated_as_trained``).
    """
    if not recal:
        return []
    lines = [
        "## BatchNorm recalibrated at each test size (FixRes-style)",
        "",
        f"Routed top-1 (%) with every BatchNorm's statistics re-estimated before each test size on "
        f"{images} training images brought to it (`msun eval --recalibrate-bn {images}`), beside "
        "the same models as trained; mean ± std over seeds.",
        "",
        _row(
            [
                "method",
                "seeds",
                "mean",
                "mean, recal.",
                "4 px",
                "4 px, recal.",
                "28 px",
                "28 px, recal.",
            ]
        ),
        _row(["---"] + ["---:"] * 7),
    ]
    for name, r in recal.items():
        a = acc[name]
        cells = [_pm(x[key]) for key in ("mean", "smallest", "full") for x in (a, r)]
        lines.append(_row([METHODS[name][3], str(r["seeds"]), *cells]))
    return [*lines, ""]


def rival_state(acc: dict[str, Any], recal: dict[str, Any], planned: int) -> str:
    """ " (provisional: k of n seeds)" while a method criteria 5-6 compare lacks seeds, else ""."""
    names = ("msun", "vanilla", "msun_pbn", "mst_pbn")
    fewest = min(t[n]["seeds"] for t in (acc, recal) for n in names if n in t)
    return f" (provisional: {fewest} of {planned} seeds)" if fewest < planned else ""


def rival_markdown(acc: dict[str, Any], recal: dict[str, Any], planned: int) -> list[str]:
    """Criteria 5 and 6, labelled provisional while their methods lack seeds."""
    rows = rival_verdict(acc, recal)
    if not rows:
        return []
    lines = [
        f"## Verdict on the rivals (pre-registered criteria 5 and 6){rival_state(acc, recal, planned)}",
        "",
        _row(["criterion", "met", "evidence"]),
        _row(["---"] * 3),
    ]
    lines += [_row([c, "yes" if ok else "**no**", e]) for c, ok, e in rows]
    return [*lines, ""]


def verdict_markdown(acc: dict[str, Any], planned: int) -> list[str]:
    if not all(n in acc for n in ("vanilla", "mst")):
        return [
            "## Verdict on the paper's criteria",
            "",
            "Not yet: vanilla and MST are not done.",
            "",
        ]
    lines = ["## Verdict on the paper's criteria (pre-registered)", ""]
    for msun in (n for n in acc if METHODS[n][0] == "msun"):
        lines += [
            f"**{METHODS[msun][3]}**{provisional(acc, msun, planned)}",
            "",
            _row(["criterion", "met", "evidence"]),
            _row(["---"] * 3),
        ]
        lines += [_row([c, "yes" if ok else "**no**", e]) for c, ok, e in verdict(acc, msun)]
        lines.append("")
    return lines


def loop_markdown(saved: dict[str, Any], loop: dict[str, Any]) -> list[str]:
    lines = [
        "## The loop: suggest-split per seed, then the split ablation (published SI)",
        "",
        _row(["vanilla seed", "suggest-split", "--split-at auto", "why"]),
        _row(["---"] * 4),
    ]
    lines += [
        _row([str(r["seed"]), r["choice"], r["auto_split"], r["reason"]]) for r in loop["seeds"]
    ]
    ablation = saved["ablation"]
    lines += [
        "",
        _row(["trunk starts at", "extra params (M)", "per seed", "mean ± std", "GFLOPs", "seeds"]),
        _row(["---"] + ["---:"] * 5),
    ]
    for split, a in ablation.items():
        per_seed = ", ".join(f"{v:.2f}" for v in a["per_seed"])
        lines.append(
            _row(
                [
                    split,
                    f"{a['extra_params'] / 1e6:.3f}",
                    per_seed,
                    _pm(a),
                    f"{a['gflops']:.4f}",
                    str(a["seeds"]),
                ]
            )
        )
    lines += ["", *loop_verdict_markdown(ablation, loop["verdict"])]
    return lines


def loop_verdict_markdown(ablation: dict[str, Any], v: dict[str, Any] | None) -> list[str]:
    if v is None:
        return ["Verdict: not yet (every split needs all its seeds).", ""]
    s, b = v["suggested"], v["best"]
    right = "**right**" if v["right"] else "**not right**"
    lines = [
        f"Suggested split (most seeds): **{s}** ({'the same' if v['same_on_every_seed'] else 'not the same'} "
        f"on every seed); best on the mean: **{b}**; gap {v['gap_to_best']:.2f} points against a pooled "
        f"seed std of {v['pooled_std']:.2f}: the suggestion is {right} by the pre-registered criterion.",
        "",
        "What a later split buys over the suggested one:",
        "",
    ]
    later = [x for x in ablation if SPLITS.index(x) > SPLITS.index(s)]
    return [*lines, *(_bought(ablation[x], ablation[s], x, v["pooled_std"]) for x in later), ""]


def _bought(a: dict[str, Any], suggested: dict[str, Any], split: str, pooled: float) -> str:
    """One line: a later split's extra parameters and FLOPs, and the accuracy they buy."""
    extra = (a["extra_params"] - suggested["extra_params"]) / 1e6
    flops = (a["gflops"] - suggested["gflops"]) * 1e3  # MFLOPs per image
    gain = a["mean"] - suggested["mean"]
    noise = "beyond" if abs(gain) > pooled else "within"
    return (
        f"- {split}: +{extra:.3f} M parameters, {flops:+.2f} MFLOPs per image (mean over the "
        f"sizes), {gain:+.2f} points of mean top-1 ({noise} the pooled seed std)"
    )


def time_markdown(data: Path) -> list[str]:
    """Training seconds per epoch, per method (the hardware is in the README's results)."""
    rows = []
    for name in METHODS:
        paths = sorted((data / "runs").glob(f"{name}_seed*.json"))
        secs = [row["train_seconds"] for p in paths for row in read_json(p)["history"]]
        if secs:
            rows.append(_row([METHODS[name][3], f"{np.mean(secs):.0f}", str(len(secs))]))
    head = [
        _row(["method", "training s per epoch (mean)", "epochs timed"]),
        _row(["---", "---:", "---:"]),
    ]
    note = "2-core CPU, torch threads 2; other work shared the machine at times, so these are not benchmarks."
    return ["## Time", "", note, "", *head, *rows, ""]


def results_markdown(
    saved: dict[str, Any], loop: dict[str, Any], budget_data: dict[str, Any], data: Path
) -> str:
    """Every table of the study, drawn from its data files only."""
    settings, acc = saved["settings"], saved["methods"]
    partial = saved["runs_done"] < saved["runs_planned"]
    lines = [
        "# Fashion-MNIST study: results (generated by figures/fashion_study.py from data/)",
        "",
        f"ResNet-18 from scratch, {settings['epochs']} epochs per run, seeds {settings['seeds']}; "
        f"{saved['runs_done']} of {saved['runs_planned']} runs done"
        + (" (**partial**: the tables hold the runs done so far)." if partial else "."),
        "",
        *budget_markdown(budget_data),
        *accuracy_markdown(acc, settings),
        *recalibration_markdown(
            saved.get("recalibrated_as_trained", {}),
            saved.get("recalibrated", {}),
            settings["recalibrate_images"],
        ),
        *verdict_markdown(acc, len(settings["seeds"])),
        *rival_markdown(acc, saved.get("recalibrated", {}), len(settings["seeds"])),
        *loop_markdown(saved, loop),
        *time_markdown(data),
    ]
    return "\n".join(lines)


def redraw(out: Path) -> None:
    """Every figure and RESULTS.md from ``out/data`` (no model needed)."""
    data = out / "data"
    saved, loop = read_json(data / "accuracy.json"), read_json(data / "loop.json")
    budget_data = read_json(data / "budget.json")
    acc, epochs = saved["methods"], saved["settings"]["epochs"]
    png(budget_figure(budget_data), out, "budget")
    if acc:
        png(accuracy_figure(acc, saved.get("recalibrated", {}), epochs), out, "accuracy_vs_size")
    seed0 = saved["settings"]["seeds"][0]
    drawn = [n for n in acc if (data / "cka" / f"{n}_seed{seed0}_rbf" / "result.json").is_file()]
    labels = [METHODS[n][3] for n in drawn]
    for suffix in ("", "_rbf"):
        results = [CKAResult.load(data / "cka" / f"{n}_seed{seed0}{suffix}") for n in drawn]
        if results:
            png(curve(results, labels=labels), out, f"fig2_cross_scale_cka{suffix}")
    for n in drawn:
        result = CKAResult.load(data / "cka" / f"{n}_seed{seed0}")
        png(
            heatmap(result, title=f"{METHODS[n][3]}, resnet18, {epochs} epochs"),
            out,
            f"heatmap_{n}",
        )
    if saved["ablation"]:
        suggested = suggested_split(loop["seeds"]) if loop["seeds"] else None
        title = (
            f"Split ablation (Fashion-MNIST, published SI, {epochs} epochs,\nmean ± std over seeds)"
        )
        planned = len(saved["settings"]["seeds"])
        png(ablation_figure(saved["ablation"], suggested, title, planned), out, "ablation_split")
    write_text(out / "RESULTS.md", results_markdown(saved, loop, budget_data, data))
    write_text(out / "README_RESULTS.md", readme_block(saved, loop, budget_data))


#: Where the study's summary sits in the repository's README (between these lines).
README_START = "<!-- fashion-study results: generated by figures/fashion_study.py --redraw -->"
README_END = "<!-- end of fashion-study results -->"


def readme_block(saved: dict[str, Any], loop: dict[str, Any], budget_data: dict[str, Any]) -> str:
    """The study's summary for the repository's README, from the data only."""
    settings, acc = saved["settings"], saved["methods"]
    done, planned = saved["runs_done"], saved["runs_planned"]
    state = "" if done == planned else f" **Partial: {done} of {planned} runs done so far.**"
    lines = [
        README_START,
        f"ResNet-18 from scratch on the native 28-px images, **{settings['epochs']} epochs** per "
        f"run (the budget a {len(budget_data['curve'])}-epoch vanilla probe chose: first within "
        f"{WITHIN_PLATEAU:g} points of its {budget_data['plateau']:.2f} % plateau at epoch "
        f"{budget_data['first_within']}, kept in [3, 6]), the same recipe for every method, "
        f"{settings['num_eval']} test images, mean ± std over seeds.{state} Every number: "
        "[figures/fashion/RESULTS.md](figures/fashion/RESULTS.md); design and criteria, written "
        "before the runs: [figures/README.md](figures/README.md).",
        "",
        "| Top-1 vs test size | Figure 2: same-layer CKA, 4 vs 28 px (95 % interval; grey: chance) |",
        "|---|---|",
        "| ![accuracy](figures/fashion/accuracy_vs_size.png) | "
        "![Figure 2](figures/fashion/fig2_cross_scale_cka.png) |",
        "",
    ]
    if acc:
        names = list(acc)
        lines += [
            _row(["top-1 (%)", *(f"{METHODS[n][3]} ({_seeds(acc[n]['seeds'])})" for n in names)]),
            _row(["---"] * (len(names) + 1)),
            _row(["mean over 13 sizes", *(_pm(acc[n]["mean"]) for n in names)]),
            _row(["4 px (1/7)", *(_pm(acc[n]["smallest"]) for n in names)]),
            _row(["28 px (full)", *(_pm(acc[n]["full"]) for n in names)]),
            "",
        ]
    if all(n in acc for n in ("vanilla", "mst")):
        for msun in (n for n in acc if METHODS[n][0] == "msun"):
            lines += [f"- {METHODS[msun][3]}{provisional(acc, msun, len(settings['seeds']))}:"]
            lines += [
                f"  - {c}: **{'met' if ok else 'not met'}** ({e})"
                for c, ok, e in verdict(acc, msun)
            ]
            lines.append("")
    recal = saved.get("recalibrated", {})
    rivals = rival_verdict(acc, recal)
    if rivals:
        lines += [f"- The rivals{rival_state(acc, recal, len(settings['seeds']))}:"]
        lines += [f"  - {c}: **{'met' if ok else 'not met'}** ({e})" for c, ok, e in rivals]
        lines.append("")
    lines += [*_loop_line(saved, loop), README_END]
    return "\n".join(lines) + "\n"


def _loop_line(saved: dict[str, Any], loop: dict[str, Any]) -> list[str]:
    chosen = ", ".join(f"seed {r['seed']}: {r['choice']}" for r in loop["seeds"]) or "not yet"
    points = ", ".join(
        f"{split} {_pm(a)} ({_seeds(a['seeds'])}, +{a['extra_params'] / 1e6:.2f} M)"
        for split, a in saved["ablation"].items()
    )
    v = loop["verdict"]
    verdict_text = (
        "the verdict waits for every split's seeds"
        if v is None
        else f"suggested {v['suggested']}, best {v['best']}, gap {v['gap_to_best']:.2f} against a "
        f"pooled seed std of {v['pooled_std']:.2f}: **{'right' if v['right'] else 'not right'}**"
    )
    return [
        f"- The loop: `suggest-split` on each seed's vanilla model ({chosen}); split ablation, "
        f"mean top-1 over the 13 sizes: {points or 'not yet'}; {verdict_text}.",
    ]


def update_readme(block: str, readme: Path) -> None:
    """Replaces the README's study block (between ``README_START`` and ``README_END``)."""
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END) + 1
    write_text(readme, text[:start] + block + text[end:])


def main() -> None:
    """The command line; a stop the library explains (Ctrl-C, a refused run) ends in its line."""
    try:
        _main()
    except CKAScopeError as e:
        print(f"fashion study: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


def _main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke settings")
    parser.add_argument(
        "--status", action="store_true", help="say what is done and left; run nothing"
    )
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="summaries, figures and RESULTS.md from <out>/data; trains nothing",
    )
    parser.add_argument(
        "--budget-only",
        action="store_true",
        help="only the probe and data/budget.json (to commit the budget before the other runs)",
    )
    parser.add_argument("--data", default="fashionmnist", help="fashionmnist or fashionmnist:DIR")
    parser.add_argument(
        "--runs", type=Path, default=DEFAULT_RUNS, help="checkpoints (outside the work tree)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "fashion")
    args = parser.parse_args()
    s = settings(args.quick, args.data)
    if args.status:
        print("\n".join(status(s, args.out / "data", args.runs)))
        return
    if args.budget_only:
        print(f"budget: {budget(s, args.out / 'data', args.runs, train=True)} epochs")
        return
    data = args.out / "data"
    if args.redraw:  # the summaries again from the records there are (a study may be running)
        epochs = budget(s, data, args.runs, train=False)
        if epochs is None:
            raise SystemExit(f"{data / 'budget.json'} is missing: nothing to redraw yet")
        summarize(s, epochs, data, args.runs)
    else:
        print("\n".join(status(s, data, args.runs)), flush=True)
        study(s, args.out, args.runs)
    redraw(args.out)
    if args.out.resolve() == (HERE / "fashion").resolve():  # the committed study
        update_readme((args.out / "README_RESULTS.md").read_text(), HERE.parent / "README.md")
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
