"""The cost of the hooks' Grams on a CPU: centred whole or in chunks, whole or packed.

``ckascope.kernels.gram_into`` centres a CPU layer's features ``CENTER_CHUNK_BYTES`` worth of
columns at a time and adds each chunk's products while the chunk is still in cache; centring
them whole (the engine before a7a7f7c) writes a centred copy as large as the layer and reads it
back. It computes only the blocks of the batch's ``BlockLayout`` (``ckascope.packing``: 3/4 of
the products at n = 128, 5/8 at n = 256); the whole Gram (depth 0) is the engine before the
packing. This script times the three on the layers of the two CPU workloads, one batch of
features each, taking turns round by round in one process (this VM's speed drifts), and checks
that all give the float64 reference's Gram to float32 rounding:

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
from ckascope.packing import BlockLayout, unpack
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


def grams(feats: list[torch.Tensor], chunk_bytes: int | None, packed: bool) -> list[torch.Tensor]:
    """Every layer's float32 Gram, centring ``chunk_bytes`` of columns at a time (None: whole),
    packed in the batch's layout or whole (unpacked only for the check, not while timed)."""
    n = feats[0].shape[0]
    layout = BlockLayout.for_size(n) if packed else BlockLayout(n)
    saved = kernels.CENTER_CHUNK_BYTES
    kernels.CENTER_CHUNK_BYTES = chunk_bytes or max(f.numel() * 4 for f in feats)
    try:
        return [kernels.packed_gram(f, torch.float32, layout) for f in feats]
    finally:
        kernels.CENTER_CHUNK_BYTES = saved


def check(feats: list[torch.Tensor], chunk_bytes: int | None, packed: bool) -> float:
    """Largest |Gram - float64 reference Gram| relative to the largest reference entry."""
    worst = 0.0
    n = feats[0].shape[0]
    layout = BlockLayout.for_size(n) if packed else BlockLayout(n)
    for f, g in zip(feats, grams(feats, chunk_bytes, packed), strict=True):
        want = ref.linear_kernel(f.double().numpy())
        got = unpack(g, layout).double().numpy()
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
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
        chunk = kernels.CENTER_CHUNK_BYTES
        settings = {  # name: (chunk bytes, packed)
            "centred whole, whole Gram": (None, False),
            f"{chunk // 2**20} MiB chunks, whole Gram": (chunk, False),
            f"{chunk // 2**20} MiB chunks, packed Gram": (chunk, True),
        }
        variants = {
            name: lambda f=feats, c=c, p=p: grams(f, c, p) for name, (c, p) in settings.items()
        }
        errors = {name: check(feats, c, p) for name, (c, p) in settings.items()}
        runs[workload] = rounds(variants, args.rounds)
        for name, t in runs[workload].items():
            rows.append(
                {
                    "workload": workload,
                    "variant": name,
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
