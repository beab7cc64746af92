"""The cost of the hooks' Grams on a CPU: features centred whole vs a chunk of columns at a time.

``ckascope.kernels.centered_gram`` centres a CPU layer's features ``CENTRE_CHUNK_BYTES`` worth
of columns at a time and adds each chunk's product while the chunk is still in cache. Centring them whole (the
engine before) writes a centred copy as large as the layer and reads it back for the product.
This script times both on the layers of the two CPU workloads, one batch of features each,
taking turns round by round in one process (this VM's speed drifts), and checks that both give
the float64 reference's Gram to float32 rounding:

    python benchmarks/bench_gram.py --rounds 7

- ``resnet18``: the 9 ``blocks`` outputs of resnet18 at 224 px, n = 128 (64x56x56 = 200 704
  features for the stem and layer1 down to 512x7x7 = 25 088 for layer4), ReLU-like features;
- ``mlp``: 50 layers of 256 features, n = 256 (one chunk: both ways are the same work).

Writes every round, the medians and the machine to ``--out`` (default results/gram.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from common import machine_info, markdown_table, set_threads, write_json

from ckascope import kernels
from tests import reference as ref  # on the path through common

#: Per workload: the examples per batch and each layer's feature shape (resnet18's ``blocks``
#: outputs at 224 px: maxpool and layer1, then layer2 .. layer4).
WORKLOADS: dict[str, tuple[int, Sequence[tuple[int, ...]]]] = {
    "resnet18": (
        128,
        [(64, 56, 56)] * 3 + [(128, 28, 28)] * 2 + [(256, 14, 14)] * 2 + [(512, 7, 7)] * 2,
    ),
    "mlp": (256, [(256,)] * 50),
}


def features(workload: str, seed: int) -> list[torch.Tensor]:
    """One batch of non-negative features per layer, with a mean well above their spread."""
    n, shapes = WORKLOADS[workload]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g).relu() + 0.5 for shape in shapes]


def grams(feats: list[torch.Tensor], chunk_bytes: int | None) -> list[torch.Tensor]:
    """Every layer's float32 Gram, centring ``chunk_bytes`` of columns at a time (None: whole)."""
    saved = kernels.CENTRE_CHUNK_BYTES
    kernels.CENTRE_CHUNK_BYTES = chunk_bytes or max(f.numel() * 4 for f in feats)
    try:
        return [kernels.centered_gram(f, torch.float32) for f in feats]
    finally:
        kernels.CENTRE_CHUNK_BYTES = saved


def check(feats: list[torch.Tensor], chunk_bytes: int | None) -> float:
    """Largest |Gram - float64 reference Gram| relative to the largest reference entry."""
    worst = 0.0
    for f, g in zip(feats, grams(feats, chunk_bytes), strict=True):
        want = ref.linear_kernel(f.double().numpy())
        worst = max(worst, float(np.abs(g.double().numpy() - want).max() / np.abs(want).max()))
    return worst


def rounds(variants: Mapping[str, Callable[[], object]], count: int) -> dict[str, list[float]]:
    """Seconds of every variant, taking turns, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(count + 1):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: t[1:] for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gram.json")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    rows, runs = [], {}
    for workload in WORKLOADS:
        feats = features(workload, 0)
        chunked = f"chunks of {kernels.CENTRE_CHUNK_BYTES // 2**20} MiB"
        variants = {
            "whole": lambda f=feats: grams(f, None),
            chunked: lambda f=feats: grams(f, kernels.CENTRE_CHUNK_BYTES),
        }
        errors = {"whole": check(feats, None), chunked: check(feats, kernels.CENTRE_CHUNK_BYTES)}
        runs[workload] = rounds(variants, args.rounds)
        for name, t in runs[workload].items():
            rows.append(
                {
                    "workload": workload,
                    "centring": name,
                    "ms_per_batch_median": 1e3 * statistics.median(t),
                    "ms_per_batch_min": 1e3 * min(t),
                    "max_rel_error_vs_float64": errors[name],
                }
            )
    print(markdown_table(rows))
    write_json(args.out, {"machine": machine_info(threads), "rows": rows, "runs": runs})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
