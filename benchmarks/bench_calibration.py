"""What calibration costs: a comparison with ``--bootstrap`` / ``--permutations`` against a plain one.

    python benchmarks/bench_calibration.py --rounds 3                 # resnet18 blocks, 32 vs 224
    python benchmarks/bench_calibration.py --workload mlp --rounds 8  # two 50-layer MLPs

The resnet18 workload is bench_interleaved's (random weights, the 9 ``blocks`` layers, 32 vs
224 px under the upsample protocol, 512 images in batches of 128, one sweep); the MLP one is
bench_compare's ``mlp-cpu`` (2 500 layer pairs: where the engine, not the forward passes, is
the cost). Every round runs each variant once in this process, the order rotating from round to
round, after one warm-up run each; the medians and each variant's ratio to the plain
comparison are printed and written to benchmarks/results/calibration-<workload>.json.

Variants: plain; ``bootstrap=1000`` (per-batch terms kept, 1000 resamples at the end);
``permutations=20`` (20 shuffled cross terms per batch, over the whole matrix); both.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from bench_interleaved import mlp, rotate
from common import describe_machine, machine_info, markdown_table, set_threads, write_json
from torch.utils.data import TensorDataset

from ckascope import compare_models, compare_scales
from ckascope.platform import build_model

VARIANTS: dict[str, dict[str, int]] = {
    "plain": {},
    "bootstrap 1000": {"bootstrap": 1000},
    "permutations 20": {"permutations": 20},
    "both": {"bootstrap": 1000, "permutations": 20},
}


def resnet18_runs() -> dict[str, Callable[[], object]]:
    model = build_model("resnet18", "none", seed=0)
    images = torch.randn(512, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images, torch.zeros(512, dtype=torch.long))
    run = partial(compare_scales, model, data, (32, 224), image_size=224, batch_size=128, seed=0)
    return {name: partial(run, **options) for name, options in VARIANTS.items()}


def mlp_runs() -> dict[str, Callable[[], object]]:
    a, b = mlp(50, 256, 0), mlp(50, 256, 1)
    # "1-px images" (bench_interleaved's): native views at scale 1 pass them unchanged
    x = torch.randn(1024, 256, 1, 1, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, torch.zeros(1024, dtype=torch.long))
    names = [f"relu{i}" for i in range(50)]
    run = partial(
        compare_models, a, b, data, scale=1, protocol="native", layers=names, batch_size=256, seed=0
    )
    return {name: partial(run, **options) for name, options in VARIANTS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=["resnet18", "mlp"], default="resnet18")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    machine = machine_info(set_threads(args.threads))
    times = rotate(resnet18_runs() if args.workload == "resnet18" else mlp_runs(), args.rounds)
    plain = statistics.median(times["plain"])
    rows = [
        {"variant": name, "median_s": statistics.median(t), "ratio": statistics.median(t) / plain}
        for name, t in times.items()
    ]
    print(f"{describe_machine(machine)}\n\n{markdown_table(rows)}")
    out = args.out or Path(__file__).parent / "results" / f"calibration-{args.workload}.json"
    write_json(out, {"args": vars(args), "machine": machine, "seconds": times, "rows": rows})


if __name__ == "__main__":
    main()
