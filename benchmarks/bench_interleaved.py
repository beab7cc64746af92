"""ckascope, pytorch-cka and the bare forward passes in one process, taking turns run by run.

``bench_compare.py`` runs each tool in its own fresh process, one after another; on a machine
whose speed drifts (a shared VM) a busy minute then lands on one tool only. Here every round runs
each tool once, in the same interpreter, so drift hits them alike, and the order rotates from
round to round, so no tool always follows the same one; the medians and the ratio of the medians
are printed. Only public APIs of the tools are called, so an older ckascope checkout can be
measured the same way (before/after a change, on the same machine).

One process can also land in a slow state for its whole life (on the 2-core VM the same
ckascope code took 240 or 310 ms per MLP comparison depending on the process, the peers and the
bare passes shifting less): ``--processes K`` runs K fresh interpreters in turn and reports the
ratio of each and their median; with several ``--checkouts`` the processes alternate between the
checkouts, so before and after a change are measured in the same minutes:

    python benchmarks/bench_interleaved.py --workload mlp --rounds 15
    python benchmarks/bench_interleaved.py --workload resnet18 --rounds 3
    git worktree add /tmp/before <commit>
    python benchmarks/bench_interleaved.py --workload mlp --rounds 8 --processes 12 \
        --checkouts /tmp/before . --out benchmarks/results/interleaved-mlp-processes.json

Writes every run's time, the medians and the machine to ``--out`` (default
benchmarks/results/interleaved-<workload>.json).

The MLP workload is bench_compare's ``mlp-cpu`` (two 50-layer MLPs, width 256, 1024 inputs,
batch 256, all 2 500 pairs); resnet18 is ``resnet18-cpu`` without the peers (random weights,
``blocks``, 32 vs 224 px with the upsample protocol, 512 images, batch 128).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import machine_info, write_json
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ckascope
from ckascope.compare import compare_models
from ckascope.platform import build_model, compare_scales


def mlp(depth: int, width: int, seed: int) -> nn.Sequential:
    """workloads.build_mlp: Flatten, then Linear + ReLU blocks, He init, zero bias."""
    modules: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(depth):
            linear = nn.Linear(width, width)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            modules[f"fc{i}"], modules[f"relu{i}"] = linear, nn.ReLU()
    return nn.Sequential(modules).eval()


def mlp_tools() -> dict[str, Callable[[], object]]:
    a, b = mlp(50, 256, 0), mlp(50, 256, 1)
    # "1-px images" (workloads.mlp_inputs): ckascope's native views at scale 1 pass them unchanged
    inputs = torch.randn(1024, 256, 1, 1, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(inputs, torch.zeros(1024, dtype=torch.long))
    names = [f"relu{i}" for i in range(50)]

    def ours() -> object:
        return compare_models(
            a, b, data, scale=1, protocol="native", layers=names, batch_size=256, seed=0
        )

    def bare() -> None:
        with torch.inference_mode():
            for x, _ in DataLoader(data, batch_size=256):
                a(x), b(x)

    tools: dict[str, Callable[[], object]] = {"bare": bare, "ckascope": ours}
    if importlib.util.find_spec("cka") is not None:
        from cka import compute_cka  # pytorch-cka 1.1.3, as its README shows

        def peer() -> object:
            loader = DataLoader(data, batch_size=256)
            return compute_cka(a, b, loader, layers=names, model2_layers=names, progress=False)

        tools["pytorch-cka"] = peer
    return tools


def _up(x: Tensor, size: int) -> Tensor:
    small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def resnet18_tools() -> dict[str, Callable[[], object]]:
    model = build_model("resnet18", "none", seed=0)
    images = torch.randn(512, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images, torch.zeros(512, dtype=torch.long))

    def ours() -> object:
        return compare_scales(model, data, (32, 224), image_size=224, batch_size=128, seed=0)

    def bare() -> None:
        with torch.inference_mode():
            for x, _ in DataLoader(data, batch_size=128):
                model(_up(x, 32)), model(x)

    return {"bare": bare, "ckascope": ours}


def run_rounds(workload: str, rounds: int) -> dict[str, list[float]]:
    """Every tool once per round (after one warm-up run each), the order rotating by round."""
    return rotate(mlp_tools() if workload == "mlp" else resnet18_tools(), rounds)


def rotate(tools: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every callable once per round, after a warm-up run each, the order rotating."""
    for run in tools.values():  # warm-up
        run()
    names = list(tools)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            tools[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians and ckascope's ratio to each other tool's median."""
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: median["ckascope"] / median[name] for name in times if name != "ckascope"}
    return {"seconds": times, "median_s": median, "ckascope_over": ratios}


def run_processes(args: argparse.Namespace) -> dict[str, Any]:
    """``--processes`` fresh interpreters, alternating between the checkouts."""
    children = []
    for i in range(args.processes):
        checkout = Path(args.checkouts[i % len(args.checkouts)]).resolve()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            command = [sys.executable, __file__, "--workload", args.workload, "--rounds"]
            command += [str(args.rounds), "--threads", str(args.threads), "--out", str(out)]
            env = {**os.environ, "PYTHONPATH": str(checkout)}
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            child = json.loads(out.read_text())
        child["checkout"] = str(checkout)
        children.append(child)
        ratio = child["ckascope_over"].get("pytorch-cka", child["ckascope_over"]["bare"])
        print(f"  process {i + 1}/{args.processes} {checkout}: ckascope / peer {ratio:.3f}")
    return {"processes": children, "by_checkout": by_checkout(children)}


def by_checkout(children: list[dict[str, Any]]) -> dict[str, Any]:
    """Per checkout: each process's ratios, their median, min and max."""
    out: dict[str, Any] = {}
    for checkout in dict.fromkeys(c["checkout"] for c in children):
        mine = [c for c in children if c["checkout"] == checkout]
        ratios: dict[str, Any] = {}
        for name in mine[0]["ckascope_over"]:
            values = [c["ckascope_over"][name] for c in mine]
            ratios[name] = {
                "per_process": values,
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
        out[checkout] = {
            "ckascope_file": mine[0]["ckascope_file"],
            "ckascope_over": ratios,
            "median_s": {
                name: statistics.median(c["median_s"][name] for c in mine)
                for name in mine[0]["median_s"]
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", choices=["mlp", "resnet18"], default="mlp")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=0, help="fresh interpreters [0: here]")
    parser.add_argument("--checkouts", nargs="+", default=["."], help="with --processes")
    parser.add_argument("--out", type=Path, help="JSON file [results/interleaved-WORKLOAD.json]")
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"interleaved-{args.workload}.json"
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine_info(args.threads),
    }
    if args.processes:
        payload.update(run_processes(args))
        for checkout, result in payload["by_checkout"].items():
            for name, r in result["ckascope_over"].items():
                print(
                    f"{checkout}: ckascope / {name}: median {r['median']:.3f} over "
                    f"{len(r['per_process'])} processes [{r['min']:.3f} .. {r['max']:.3f}]"
                )
    else:
        payload.update(
            summary(run_rounds(args.workload, args.rounds)), ckascope_file=ckascope.__file__
        )
        print(
            f"ckascope {ckascope.__version__} from {ckascope.__file__}, {args.workload}, "
            f"{args.rounds} rounds, {torch.get_num_threads()} threads"
        )
        for name, t in payload["seconds"].items():
            median = payload["median_s"][name]
            print(f"  {name:12s} median {median:.3f} s  [{min(t):.3f} .. {max(t):.3f}]")
        for name, ratio in payload["ckascope_over"].items():
            print(f"  ckascope / {name}: {ratio:.3f}")
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
