"""ckascope vs the peer CKA tools and vs the bare forward passes, on identical inputs.

Full run (roughly 35-50 min on 2 quiet cores: resnet18 ~20-25 min, MLP ~10-15 min; the GPU
workload runs only where CUDA is available):

    .venv/bin/python benchmarks/bench_compare.py

Quick smoke run (a minute or two):

    .venv/bin/python benchmarks/bench_compare.py --num-images 16 --batch-size 8 --image-size 32 \
        --scales 8 32 --mlp-depth 4 --mlp-width 16 --mlp-images 32 --mlp-batch 16 --repeats 1 \
        --out benchmarks/results/compare-smoke.json

Workloads (``--workloads``):

- ``resnet18-cpu``: resnet18 (random weights), ``blocks`` preset (9 layers), scales 32 vs 224
  (32 px resized back up to 224, bilinear, no antialias: ckascope's default ``upsample``
  protocol), 512 synthetic images pre-rendered at 224, batch 128, on CPU.
- ``resnet50-cpu``: the same with resnet50 (17 layers), 256 images, batch 64 (``--r50-*``).
- ``mlp-cpu``: two 50-layer MLPs (width 256, He init, seeds 0 and 1) on the same 1024 Gaussian
  inputs, batch 256; all 50 x 50 pairs of ReLU outputs (a cross-model comparison).
- ``resnet50-gpu``: resnet50 ``blocks`` (17 layers), scales 32 vs 224, 5000 images (cycling
  through 1024 distinct pre-rendered ones, ``--distinct-images``), batch 128, on CUDA. Skipped,
  and recorded as skipped, without CUDA; never estimated.

Method: every tool (and the bare forward passes, and the reference) runs in its own freshly
spawned interpreter with the same thread count. In it, the workload is built (model, images
loaded from the parent's pre-rendered tensor file), the tool runs once on the first batch as a
warm-up, then ``--repeats`` timed runs over all batches; the median wall time is reported, and
the peak memory of the timed runs (see common.py). All tools get the same batches (ckascope's
seeded permutation), and their matrices are compared with a float64 reference computed from
the same features by code that shares nothing with ckascope (common.py). The bare floor is the
two forward passes per batch (resize included) under ``torch.inference_mode()`` with no hooks,
fed by the same DataLoader, the model in its own (contiguous) layout and float32: the plain
passes a user writes. Overhead = ckascope time / bare time. ``ckascope-contiguous`` and
``ckascope-bf16`` are ckascope with ``memory_format="contiguous"`` and ``precision="bf16"``; each
ckascope row's "max abs diff vs ckascope-contiguous" is the effect of its mode on the matrix.

Prints markdown tables and writes benchmarks/results/compare.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    RESULTS_DIR,
    describe_machine,
    machine_info,
    markdown_table,
    matrix_error,
    run_isolated_row,
    set_threads,
    write_json,
)
from peers import TOOLS, PeerOptions, reference_job, tool_job
from workloads import MLPSpec, ResNetSpec, Spec, pool_file, render_pool

WORKLOADS = ("resnet18-cpu", "resnet50-cpu", "mlp-cpu", "resnet50-gpu")
PEERS = ("ckascope", "pytorch-cka", "torch-cka", "ckatorch", "ckatorch-base")
#: ckascope's other execution modes: the model's own layout, and bf16 forward passes.
VARIANTS = ("ckascope-contiguous", "ckascope-bf16")
#: ckatorch-base keeps every image's features of every layer: only the MLP's fit comfortably.
DEFAULT_TOOLS = {
    "resnet18-cpu": (*PEERS[:1], *VARIANTS, *PEERS[1:4]),
    "resnet50-cpu": (*PEERS[:1], *VARIANTS, *PEERS[1:2]),
    "mlp-cpu": PEERS,
    "resnet50-gpu": (*PEERS[:1], *VARIANTS, *PEERS[1:4]),
}
COLUMNS = [
    ("tool", "tool"),
    ("estimator", "estimator"),
    ("median_s", "time (s)"),
    ("vs_ckascope", "time / ckascope"),
    ("peak_rss_mib", "peak RSS (MiB)"),
    ("extra_rss_mib", "RSS over baseline (MiB)"),
    ("max_abs_err", "max abs err vs float64"),
    ("vs_contiguous", "max abs diff vs ckascope-contiguous"),
    ("nan_cells", "NaN cells"),
    ("load_before", "load avg"),
    ("notes", "notes"),
]
GPU_COLUMNS = [
    *COLUMNS[:6],
    ("cuda_peak_mib", "GPU peak (MiB)"),
    ("cuda_extra_mib", "GPU over baseline (MiB)"),
    *COLUMNS[6:],
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument(
        "--tools", nargs="+", choices=PEERS + VARIANTS, help="default: every tool that fits"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: every available core)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per tool (median)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds in which every tool runs --repeats times in a fresh process, in turn; the "
        "median is over all rounds' runs (a busy machine then slows every tool alike)",
    )
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("resnet18-cpu")
    g.add_argument("--cpu-model", default="resnet18")
    g.add_argument("--num-images", type=int, default=512)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--image-size", type=int, default=224, help="base images and model input")
    g.add_argument("--scales", type=int, nargs=2, default=[32, 224])
    g = p.add_argument_group("resnet50-cpu (scales and image size as resnet18-cpu)")
    g.add_argument("--r50-images", type=int, default=256)
    g.add_argument("--r50-batch", type=int, default=64)
    g = p.add_argument_group("mlp-cpu")
    g.add_argument("--mlp-depth", type=int, default=50)
    g.add_argument("--mlp-width", type=int, default=256)
    g.add_argument("--mlp-images", type=int, default=1024)
    g.add_argument("--mlp-batch", type=int, default=256)
    g.add_argument("--mlp-init", choices=["kaiming", "default"], default="kaiming")
    g = p.add_argument_group("resnet50-gpu")
    g.add_argument("--gpu-model", default="resnet50")
    g.add_argument("--gpu-images", type=int, default=5000)
    g.add_argument("--gpu-batch", type=int, default=128)
    g = p.add_argument_group("peers")
    g.add_argument(
        "--distinct-images",
        type=int,
        default=1024,
        help="at most this many distinct images are rendered; more are cycled",
    )
    g.add_argument("--torch-cka-no-grad", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ckatorch-mode", choices=["auto", "stacked", "streamed"], default="auto")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "compare.json")
    return p.parse_args(argv)


def make_spec(name: str, args: argparse.Namespace, tmp: Path) -> Spec:
    """The workload's spec; renders its images into ``tmp`` (untimed, once for every tool)."""
    if name == "mlp-cpu":
        return MLPSpec(
            args.mlp_depth,
            args.mlp_width,
            args.mlp_images,
            args.mlp_batch,
            "cpu",
            args.mlp_init,
            args.seed,
        )
    arch, images, batch = {
        "resnet18-cpu": (args.cpu_model, args.num_images, args.batch_size),
        "resnet50-cpu": ("resnet50", args.r50_images, args.r50_batch),
        "resnet50-gpu": (args.gpu_model, args.gpu_images, args.gpu_batch),
    }[name]
    start = time.perf_counter()
    pool = render_pool(min(images, args.distinct_images), args.image_size, args.seed)
    print(f"rendered {len(pool)} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    device = "cuda" if name.endswith("-gpu") else "cpu"
    spec = (arch, tuple(args.scales), args.image_size, images, batch, device)
    return ResNetSpec(*spec, pool_file(tmp, name, pool), args.seed)


def score(row: dict[str, Any], reference: dict[str, Any], plain: np.ndarray | None) -> None:
    """Adds the error against the reference of the tool's estimator, and for ckascope's modes
    the largest difference from ckascope's float32 contiguous matrix (``plain``)."""
    if "matrix" not in row:
        return
    if row["tool"].startswith("ckascope") and plain is not None:
        row["vs_contiguous"] = float(np.abs(np.asarray(row["matrix"]) - plain).max())
    biased = TOOLS[row["tool"]].estimator.startswith("full-batch")
    ref = reference["biased_hsic0" if biased else "minibatch_hsic1"]
    row.update(matrix_error(row["matrix"], ref))
    row["reference"] = "biased_hsic0" if biased else "minibatch_hsic1"


def run_workload(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    spec = make_spec(name, args, tmp)
    tools = [t for t in DEFAULT_TOOLS[name] if args.tools is None or t in args.tools]
    opts = PeerOptions(args.torch_cka_no_grad, args.ckatorch_mode)
    biased = any(TOOLS[t].estimator.startswith("full-batch") for t in tools)
    start = time.perf_counter()
    reference = run_isolated_row(reference_job, spec, args.threads, biased)
    if "error" in reference:
        raise RuntimeError(f"the reference failed on {name}: {reference['error']}")
    reference["seconds"] = time.perf_counter() - start
    rounds: dict[str, list[dict[str, Any]]] = {tool: [] for tool in ["bare", *tools]}
    for r in range(args.rounds):  # the tools take turns, so a busy spell hits them alike
        for tool in rounds:
            print(f"[{name}] round {r + 1}/{args.rounds}: {tool} ...", file=sys.stderr, flush=True)
            job = run_isolated_row(tool_job, tool, spec, args.threads, args.repeats, opts)
            rounds[tool].append({"tool": tool, **job})
    merged = {tool: merge_rounds(runs) for tool, runs in rounds.items()}
    plain = merged.get("ckascope-contiguous", {}).get("matrix")
    rows = []
    for tool, row in merged.items():
        row["estimator"] = TOOLS[tool].estimator
        score(row, reference, None if plain is None else np.asarray(plain))
        rows.append(row)
    summary = summarize(rows)
    checks = targets(name, rows, summary["overhead"])
    return {
        "spec": spec,
        "tools": tools,
        "reference": reference,
        "rows": rows,
        "targets": checks,
        **summary,
    }


def merge_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a tool's rounds: the median of all their timed runs, the largest memory."""
    row = dict(runs[0])
    failed = [r for r in runs if "error" in r]
    if failed:
        return {**row, "error": failed[0]["error"]}
    row["seconds"] = [t for r in runs for t in r["seconds"]]
    row["median_s"] = float(np.median(row["seconds"]))
    loads = [r["load_before"] for r in runs if r.get("load_before") is not None]
    row["load_before"] = max(loads, default=None)
    for key in ("peak_rss_mib", "extra_rss_mib", "cuda_peak_mib", "cuda_extra_mib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = max(values, default=None)
    row["rounds"] = len(runs)
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Time ratios against ckascope and ckascope's overhead over the bare forward passes."""
    times = {r["tool"]: r.get("median_s") for r in rows}
    base = times.get("ckascope")
    for row in rows:
        if base and row.get("median_s"):
            row["vs_ckascope"] = row["median_s"] / base
        if "error" in row:
            row["notes"] = f"FAILED: {row['error']}"
    bare = times.get("bare")
    overhead = base / bare if base and bare else None
    return {"overhead": overhead, "bare_throughput_fraction": 1 / overhead if overhead else None}


def report(name: str, result: dict[str, Any]) -> str:
    spec = result["spec"]
    gpu = getattr(spec, "device", "cpu") == "cuda"
    lines = [f"## {name}: {spec.describe()}", ""]
    lines.append(markdown_table(result["rows"], GPU_COLUMNS if gpu else COLUMNS))
    lines.append("")
    if result["overhead"] is not None:
        lines.append(f"ckascope / bare forward passes = {result['overhead']:.3f}")
    ref = result["reference"]
    lines.append(f"float64 reference: {ref['batches']} batches, {ref['seconds']:.1f} s")
    lines += [f"- target: {text}: {verdict}" for text, verdict in result["targets"]]
    return "\n".join(lines)


def targets(name: str, rows: list[dict[str, Any]], overhead: float | None) -> list[tuple[str, str]]:
    """The project's speed and accuracy targets (benchmarks/README.md) checked on this run.

    Returns:
        (target, "yes" / "NO" / "n/a") pairs.
    """
    by_tool = {r["tool"]: r for r in rows}

    def ratio(tool: str) -> float | None:
        return by_tool.get(tool, {}).get("vs_ckascope")

    def check(value: float | None, ok: Callable[[float], bool]) -> str:
        return "n/a" if value is None else ("yes" if ok(value) else "NO")

    err = by_tool.get("ckascope", {}).get("max_abs_err")
    out = [("ckascope max abs error <= 1e-6", check(err, lambda e: e <= 1e-6))]
    if name == "resnet50-gpu":
        out.append(("ckascope >= 90 % of bare throughput", check(overhead, lambda o: o <= 1 / 0.9)))
        for peer in ("pytorch-cka", "torch-cka", "ckatorch"):
            out.append((f"faster than {peer}", check(ratio(peer), lambda r: r > 1)))
    if name in ("resnet18-cpu", "resnet50-cpu", "resnet50-gpu"):  # the layout's targets
        out.append(
            ("<= 0.80x pytorch-cka's time", check(ratio("pytorch-cka"), lambda r: r >= 1.25))
        )
        out.append(("<= 0.85x the plain passes' time", check(overhead, lambda o: o <= 0.85)))
        same = by_tool.get("ckascope", {}).get("vs_contiguous")
        out.append(("within 1e-6 of float32 contiguous", check(same, lambda d: d <= 1e-6)))
    if name == "resnet18-cpu":
        out.append(("overhead over bare <= 1.15", check(overhead, lambda o: o <= 1.15)))
        out.append(("no slower than pytorch-cka", check(ratio("pytorch-cka"), lambda r: r >= 1)))
        out.append((">= 5x faster than torch-cka", check(ratio("torch-cka"), lambda r: r >= 5)))
        peer_err = by_tool.get("pytorch-cka", {}).get("max_abs_err")
        closer = None if err is None or peer_err is None else peer_err / max(err, 1e-300)
        out.append(("error >= 100x below pytorch-cka's", check(closer, lambda c: c >= 100)))
    return out


def tool_table() -> str:
    rows = [{"tool": k, **vars(v)} for k, v in TOOLS.items()]
    columns = [
        ("tool", "tool"),
        ("call", "call"),
        ("estimator", "estimator"),
        ("precision", "precision"),
        ("capture", "layer capture"),
    ]
    return markdown_table(rows, columns)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # peers' progress bars, inherited by children
    threads = set_threads(args.threads)
    info = machine_info(threads)
    print(f"# Compare benchmark\n\n{describe_machine(info)}\n\n{tool_table()}\n")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ckascope-bench-") as tmp:
        for name in args.workloads:
            if name.endswith("-gpu") and not torch.cuda.is_available():
                results[name] = {"skipped": "CUDA is not available on this machine"}
                print(f"## {name}: skipped (no CUDA; no GPU row is estimated)\n")
                continue
            results[name] = run_workload(name, args, Path(tmp))
            print(report(name, results[name]) + "\n", flush=True)
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "args": vars(args),
        "machine": info,
        "workloads": results,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
