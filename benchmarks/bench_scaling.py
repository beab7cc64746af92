"""ckascope's time and peak memory vs the number of images and vs the number of layers.

Full run on CPU (2 quiet cores: roughly 10-15 min with the cap at 4096 images, 35-45 min without):

    .venv/bin/python benchmarks/bench_scaling.py --max-images 4096

On a GPU machine (all sizes):

    .venv/bin/python benchmarks/bench_scaling.py --device cuda

Quick smoke run (a minute or two):

    .venv/bin/python benchmarks/bench_scaling.py --images 16 32 64 --image-size 32 --scales 8 32 \
        --batch-size 8 --distinct-images 16 --layers 2 4 8 --mlp-width 16 --mlp-images 64 \
        --mlp-batch 16 --out benchmarks/results/scaling-smoke.json

Images: resnet18 ``blocks`` (9 layers) at scales 32 vs 224, batch 128, on 256, 1024, 4096 and
16384 images (``--max-images`` drops the larger sizes). The images cycle through a fixed pool of
``--distinct-images`` pre-rendered synthetic images, so the data's own memory does not grow with
the count and only ckascope's could. Expected: peak memory flat, time linear (fit below).

Layers: two MLPs (width 256, 1024 inputs, batch 256, seeds 0 and 1) of 10, 25, 50, 100 and 200
layers, ``compare_models`` over all ReLU outputs (L x L pairs). The forward passes and Grams grow
linearly in L; the all-pairs product grows as L² but stays small next to them at these sizes.
Memory grows linearly in L (one (n, n) Gram per layer and side per batch).

Each point runs in a fresh process: one warm-up batch, then ``--repeats`` timed runs of
``compare_scales`` / ``compare_models`` (median), peak memory of the timed runs (common.py).

Prints markdown tables, writes benchmarks/results/scaling.json and benchmarks/results/scaling.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    RESULTS_DIR,
    describe_machine,
    machine_info,
    markdown_table,
    run_isolated_row,
    set_threads,
    write_json,
)
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from peers import PeerOptions, tool_job
from workloads import MLPSpec, ResNetSpec, Spec, pool_file, render_pool

from ckascope.platform import atomic_path

COLUMNS = [
    ("median_s", "time (s)"),
    ("peak_rss_mib", "peak RSS (MiB)"),
    ("extra_rss_mib", "RSS over baseline (MiB)"),
    ("cuda_peak_mib", "GPU peak (MiB)"),
    ("load_before", "load avg"),
    ("notes", "notes"),
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sweeps", nargs="+", choices=["images", "layers"], default=["images", "layers"]
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="torch threads (default: every available core)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per point (median)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("images sweep")
    g.add_argument("--images", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    g.add_argument("--max-images", type=int, help="drop image counts above this (CPU time)")
    g.add_argument("--model", default="resnet18")
    g.add_argument("--scales", type=int, nargs=2, default=[32, 224])
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--distinct-images", type=int, default=256, help="size of the image pool")
    g = p.add_argument_group("layers sweep")
    g.add_argument("--layers", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    g.add_argument("--mlp-width", type=int, default=256)
    g.add_argument("--mlp-images", type=int, default=1024)
    g.add_argument("--mlp-batch", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "scaling.json")
    p.add_argument("--plot", type=Path, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def point(spec: Spec, args: argparse.Namespace, x: int, unit: int) -> dict[str, Any]:
    """One measured point in a fresh process; ``unit`` divides the time for "ms per unit"."""
    print(f"  {x} ...", file=sys.stderr, flush=True)
    row = run_isolated_row(tool_job, "ckascope", spec, args.threads, args.repeats, PeerOptions())
    row.pop("matrix", None)
    row["notes"] = ""
    row["x"] = x
    if "median_s" in row:
        row["ms_per_unit"] = 1000 * row["median_s"] / unit
    if "error" in row:
        row["notes"] = f"FAILED: {row['error']}"
    return row


def images_sweep(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    counts = [n for n in args.images if args.max_images is None or n <= args.max_images]
    pool = render_pool(min(args.distinct_images, max(counts)), args.image_size, args.seed)
    path = pool_file(tmp, "scaling", pool)
    del pool
    rows = []
    for n in counts:
        spec = ResNetSpec(
            args.model,
            tuple(args.scales),
            args.image_size,
            n,
            args.batch_size,
            args.device,
            path,
            args.seed,
        )
        rows.append(point(spec, args, n, n))
    return rows


def layers_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for depth in args.layers:
        spec = MLPSpec(
            depth,
            args.mlp_width,
            args.mlp_images,
            args.mlp_batch,
            args.device,
            "kaiming",
            args.seed,
        )
        rows.append(point(spec, args, depth, depth))
    return rows


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares line of time vs x (R² near 1: linear) and the spread of peak memory."""
    ok = [r for r in rows if "median_s" in r]
    if len(ok) < 2:
        return {}
    x = np.array([r["x"] for r in ok], dtype=float)
    t = np.array([r["median_s"] for r in ok])
    slope, intercept = np.polyfit(x, t, 1)
    residual = t - (slope * x + intercept)
    r2 = 1 - float(residual @ residual) / float(((t - t.mean()) ** 2).sum() or 1.0)
    peaks = np.array([r["peak_rss_mib"] for r in ok])
    extra = np.array([r["extra_rss_mib"] for r in ok])
    return {
        "time_slope_s": float(slope),
        "time_intercept_s": float(intercept),
        "time_r2": r2,
        "peak_rss_growth": float(peaks.max() / peaks.min() - 1),
        "peak_rss_last_vs_first": float(peaks[-1] / peaks[0] - 1),
        "extra_rss_range_mib": [float(extra.min()), float(extra.max())],
    }


def report(title: str, unit: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    per_unit = ("ms_per_unit", f"ms per {unit.rstrip('s')}")
    table = markdown_table(rows, [("x", unit), COLUMNS[0], per_unit, *COLUMNS[1:]])
    lines = [f"## {title}", "", table, ""]
    if summary:
        slope = summary["time_slope_s"]
        lines.append(
            f"time ≈ {summary['time_intercept_s']:.3g} s {'-' if slope < 0 else '+'} "
            f"{abs(slope):.3g} s x {unit} (R² = {summary['time_r2']:.4f}); peak RSS, last vs first point: "
            f"{100 * summary['peak_rss_last_vs_first']:+.1f} %"
        )
    return "\n".join(lines)


def draw(ax_time: Axes, ax_mem: Axes, rows: list[dict[str, Any]], unit: str) -> None:
    ok = [r for r in rows if "median_s" in r]
    if not ok:
        return
    x = np.array([r["x"] for r in ok], dtype=float)
    t = np.array([r["median_s"] for r in ok])
    ax_time.loglog(x, t, "o-", label="ckascope")
    ax_time.loglog(x, t[-1] * x / x[-1], "--", color="grey", label="linear")
    ax_time.set_ylabel("wall time (s)")
    ax_time.legend()
    ax_mem.semilogx(x, [r["peak_rss_mib"] for r in ok], "o-", label="peak RSS")
    ax_mem.semilogx(x, [r["extra_rss_mib"] for r in ok], "s-", label="RSS over baseline")
    if ok[0].get("cuda_peak_mib") is not None:
        ax_mem.semilogx(x, [r["cuda_peak_mib"] for r in ok], "^-", label="GPU peak")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_ylim(bottom=0)
    ax_mem.legend()
    for ax in (ax_time, ax_mem):
        # Ticks at the measured sizes, in plain numbers (log axes default to 2x10^1 minors).
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(x, [str(int(v)) for v in x])
        ax.set_xlabel(unit)


def plot(path: Path, results: dict[str, Any], machine: str) -> None:
    """2 x 2 figure: time and memory vs images (top), vs layers (bottom)."""
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False)
    for row_axes, (key, unit) in zip(
        axes, [("images", "images"), ("layers", "layers")], strict=True
    ):
        draw(row_axes[0], row_axes[1], results.get(key, {}).get("rows", []), unit)
        row_axes[0].set_title(f"ckascope time vs {unit}")
        row_axes[1].set_title(f"ckascope peak memory vs {unit}")
    fig.suptitle(textwrap.fill(machine, 160), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
    os.environ.setdefault("TQDM_DISABLE", "1")
    info = machine_info(set_threads(args.threads))
    print(f"# Scaling benchmark ({args.device})\n\n{describe_machine(info)}\n")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ckascope-bench-") as tmp:
        if "images" in args.sweeps:
            rows = images_sweep(args, Path(tmp))
            results["images"] = {"rows": rows, "fit": fit(rows)}
            title = f"images: {args.model} blocks, scales {args.scales}, batch {args.batch_size}"
            print(report(title, "images", rows, results["images"]["fit"]) + "\n", flush=True)
    if "layers" in args.sweeps:
        rows = layers_sweep(args)
        results["layers"] = {"rows": rows, "fit": fit(rows)}
        title = (
            f"layers: MLP width {args.mlp_width}, {args.mlp_images} inputs, batch {args.mlp_batch}"
        )
        print(report(title, "layers", rows, results["layers"]["fit"]) + "\n", flush=True)
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "args": vars(args),
        "machine": info,
        "results": results,
    }
    write_json(args.out, payload)
    png = args.plot or args.out.with_suffix(".png")
    plot(png, results, describe_machine(info))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
