"""Engine cost per batch: one matrix product for all layer pairs vs a loop over pairs, and the
memory of the accumulator vs the number of batches.

    python benchmarks/bench_engine.py --layers 50 --batch 256 --width 512

Prints markdown tables and writes benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import platform
import resource
from pathlib import Path

import torch
from common import markdown_table, median_time, write_json

from ckascope import MinibatchCKA
from ckascope.functional import batch_hsic_terms
from ckascope.kernels import centered_gram, hsic1, ucenter_gram


def grams(layers: int, batch: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, width, generator=g) for _ in range(layers)]
    return torch.stack([centered_gram(f, torch.float64) for f in feats])  # (L, n, n)


def per_pair_loop(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """The usual implementation: U-centre once per layer, then one reduction per pair."""
    ua, ub = ucenter_gram(ka), ucenter_gram(kb)
    n = ka.shape[-1]
    out = torch.empty(ka.shape[0], kb.shape[0], dtype=torch.float64)
    for i in range(ka.shape[0]):
        for j in range(kb.shape[0]):
            out[i, j] = (ua[i] * ub[j]).sum() / (n * (n - 3))
    return out


def per_pair_naive(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """HSIC1 from scratch for every pair, as per-pair tools do."""
    out = torch.empty(ka.shape[0], kb.shape[0], dtype=torch.float64)
    for i in range(ka.shape[0]):
        for j in range(kb.shape[0]):
            out[i, j] = hsic1(ka[i], kb[j])
    return out


def engine_rows(layers: int, batch: int, width: int, repeats: int) -> list[dict[str, object]]:
    ka, kb = grams(layers, batch, width, 0), grams(layers, batch, width, 1)
    batched, _, _ = batch_hsic_terms(ka, kb)
    torch.testing.assert_close(batched, per_pair_loop(ka, kb), rtol=1e-9, atol=1e-12)
    rows: list[dict[str, object]] = []
    for name, fn, reps in [
        ("batched product (ckascope)", lambda: batch_hsic_terms(ka, kb), repeats),
        ("per-pair loop, U-centred once", lambda: per_pair_loop(ka, kb), max(1, repeats // 5)),
        ("per-pair HSIC1 from scratch", lambda: per_pair_naive(ka, kb), 1),
    ]:
        rows.append({"method": name, "seconds_per_batch": median_time(fn, reps)})
    return rows


def memory_rows(layers: int, batch: int, width: int, counts: list[int]) -> list[dict[str, object]]:
    ga, gb = grams(layers, batch, width, 2), grams(layers, batch, width, 3)
    rows: list[dict[str, object]] = []
    for count in counts:
        metric = MinibatchCKA(layers, layers)
        for _ in range(count):
            metric.update_grams(ga, gb)
        metric.compute()
        tensors = [t for t in metric.metric_state.values() if isinstance(t, torch.Tensor)]
        state = sum(t.numel() * t.element_size() for t in tensors)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append({"batches": count, "state_bytes": state, "peak_rss_mib": rss})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "engine.json"
    )
    args = parser.parse_args()
    engine = engine_rows(args.layers, args.batch, args.width, args.repeats)
    memory = memory_rows(args.layers, args.batch, args.width, args.batches)
    print(
        f"## {args.layers} x {args.layers} layers, batch {args.batch}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n"
    )
    print(markdown_table(engine) + "\n\n" + markdown_table(memory))
    write_json(
        args.out,
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "engine": engine,
            "memory": memory,
        },
    )


if __name__ == "__main__":
    main()
