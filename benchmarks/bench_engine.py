"""Engine cost per batch: one matrix product for all layer pairs vs a loop over pairs, what each
step of the engine's design buys, and the memory of the accumulator vs the number of batches.

    python benchmarks/bench_engine.py --layers 50 --batch 256 --width 512
    python benchmarks/bench_engine.py --layers 50 --batch 256 --width 256 --ablation-only

Prints markdown tables and writes benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import markdown_table, median_time, write_json

from ckascope import MinibatchCKA, functional
from ckascope.functional import batch_hsic_terms
from ckascope.kernels import centered_gram, hsic1, ucenter_gram
from ckascope.packing import BlockLayout, pack


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


# --- ablation: the steps from the previous engine to the present one ------------------------------
#
# Input: what the hooks hand the metric per batch, La + Lb float32 Grams of centred features.
# Every variant returns the same (cross, self_a, self_b) up to float64 rounding (checked).


def _fresh_stack(grams: list[torch.Tensor]) -> torch.Tensor:
    stack = torch.empty(len(grams), *grams[0].shape, dtype=torch.float64)
    for i, g in enumerate(grams):
        stack[i].copy_(g)
    return stack


def previous_engine(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Up to commit 9e80c28: a fresh float64 stack, U-centred in place, one product."""
    ua, ub = (
        ucenter_gram(_fresh_stack(ga), inplace=True),
        ucenter_gram(_fresh_stack(gb), inplace=True),
    )
    n = ga[0].shape[-1]
    va, vb = ua.flatten(1), ub.flatten(1)
    scale = 1.0 / (n * (n - 3))
    return (
        (va @ vb.T) * scale,
        torch.linalg.vecdot(va, va, dim=1) * scale,
        torch.linalg.vecdot(vb, vb, dim=1) * scale,
    )


def _full_stats(work: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonals, row sums of K̃ and <K̃, K̃> of whole float64 matrices (L, n, n)."""
    diag = work.diagonal(dim1=-2, dim2=-1)
    sq = torch.einsum("ij,ij->i", work.flatten(1), work.flatten(1)) - (diag * diag).sum(1)
    return diag, work.sum(dim=-1) - diag, sq


def _full_song(
    ka: torch.Tensor,
    kb: torch.Tensor,
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    stats: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Song et al.'s form on whole matrices (the engine of 9e80c28..6fd51d1, in the same terms as
    ``functional.packed_hsic1_terms``, which took its place)."""
    n = ka.shape[-1]
    (da, ra, qa), (db, rb, qb) = stats or (_full_stats(ka), _full_stats(kb))
    sa, sb = ra.sum(-1), rb.sum(-1)
    c2, c3 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
    cross = product(ka.flatten(1), kb.flatten(1)) - da @ db.T + c2 * torch.outer(sa, sb)
    cross -= c3 * (ra @ rb.T)
    scale = 1.0 / (n * (n - 3))
    self_a = (qa + c2 * sa * sa - c3 * (ra * ra).sum(1)) * scale
    return cross * scale, self_a, (qb + c2 * sb * sb - c3 * (rb * rb).sum(1)) * scale


def song_form(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Step 1: Song et al.'s form on the fresh stacks (no U-centring), one plain product."""
    return _full_song(_fresh_stack(ga), _fresh_stack(gb), lambda va, vb: va @ vb.T)


def sliced_product(ga: list[torch.Tensor], gb: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Step 2: + the product cut into slices of the inner dimension."""
    product = functional._inner_products
    return _full_song(_fresh_stack(ga), _fresh_stack(gb), product)


class WholeWorkspace:
    """Step 3: + a float64 workspace reused from batch to batch, each layer's statistics taken
    while its matrix is in cache (``MinibatchCKA`` of a7a7f7c..6fd51d1)."""

    def __init__(self, layers: int, n: int) -> None:
        self.work = [torch.empty(layers, n, n, dtype=torch.float64) for _ in range(2)]

    def __call__(self, ga: list[torch.Tensor], gb: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        stats = tuple(self._copy(g, w) for g, w in zip((ga, gb), self.work, strict=True))
        product = functional._inner_products
        return _full_song(self.work[0], self.work[1], product, stats)  # type: ignore[arg-type]

    @staticmethod
    def _copy(grams: list[torch.Tensor], work: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows = work.new_empty(work.shape[:2])
        sq = work.new_empty(work.shape[:1])
        for i, gram in enumerate(grams):
            g = work[i].copy_(gram)
            torch.sum(g, dim=1, out=rows[i])
            torch.dot(g.view(-1), g.view(-1), out=sq[i])
        diag = work.diagonal(dim1=-2, dim2=-1)
        return diag, rows - diag, sq - (diag * diag).sum(1)


def ablation_rows(layers: int, batch: int, width: int, repeats: int) -> list[dict[str, object]]:
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(batch, width, generator=g).relu() for _ in range(2 * layers)]
    grams_ = [centered_gram(f, torch.float32) for f in feats]
    ga, gb = grams_[:layers], grams_[layers:]
    layout = BlockLayout.for_size(batch)
    # What the hooks hand the metric since the packing: float64 stacks of packed Grams.
    pa, pb = (torch.stack([pack(x, layout).double() for x in side]) for side in (ga, gb))
    metric = MinibatchCKA(layers, layers)
    whole = WholeWorkspace(layers, batch)
    variants: list[tuple[str, Callable[[], object]]] = [
        (
            "previous engine: fresh float64 stack, U-centring, one product",
            lambda: previous_engine(ga, gb),
        ),
        ("1. Song's form: no U-centring, inputs only read", lambda: song_form(ga, gb)),
        ("2. + product in slices of the inner dimension", lambda: sliced_product(ga, gb)),
        ("3. + reused workspace, statistics per layer", lambda: whole(ga, gb)),
        (
            "4. whole float32 Grams, statistics in batched passes (MinibatchCKA.update_grams)",
            lambda: metric.update_grams(ga, gb),
        ),
        (
            f"5. packed float64 Grams from the hooks, {layout.size / batch**2:.3g} of the "
            "values (MinibatchCKA.update_packed, the sweep)",
            lambda: metric.update_packed(pa, pb, layout),
        ),
    ]
    want = previous_engine(ga, gb)
    tolerance = 1e-10 * float(want[1].abs().max())  # of the largest self term
    packed = lambda: functional.packed_hsic1_terms(pa, pb, layout)  # noqa: E731
    for step in (
        lambda: song_form(ga, gb),
        lambda: sliced_product(ga, gb),
        lambda: whole(ga, gb),
        packed,
    ):
        for got, ref_ in zip(step(), want, strict=True):
            torch.testing.assert_close(got, ref_, rtol=0, atol=tolerance)
    peer = _pytorch_cka_engine(ga, gb)
    if peer is not None:
        variants.append(("pytorch-cka 1.1.3's engine on the same Grams (float32)", peer))
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(repeats + 1):  # interleaved, so a busy moment hits every variant alike
        for name, fn in variants:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return [
        {
            "method": name,
            "ms_per_batch_median": 1e3 * statistics.median(t[1:]),
            "ms_per_batch_min": 1e3 * min(t[1:]),
        }
        for name, t in times.items()
    ]


def _pytorch_cka_engine(
    ga: list[torch.Tensor], gb: list[torch.Tensor]
) -> Callable[[], object] | None:
    if importlib.util.find_spec("cka") is None:
        return None
    from cka.hsic import hsic  # pytorch-cka 1.1.3: float32 stacked Grams, Song's form

    sums = [torch.zeros(len(ga), len(gb)), torch.zeros(len(ga)), torch.zeros(len(gb))]

    def run() -> None:
        for total, term in zip(sums, hsic(torch.stack(ga), torch.stack(gb)), strict=True):
            total += term

    return run


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
    parser.add_argument("--ablation-repeats", type=int, default=30)
    parser.add_argument(
        "--ablation-only", action="store_true", help="only the engine's design steps"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "engine.json"
    )
    args = parser.parse_args()
    print(
        f"## {args.layers} x {args.layers} layers, batch {args.batch}, width {args.width}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}\n"
    )
    ablation = ablation_rows(args.layers, args.batch, args.width, args.ablation_repeats)
    print(markdown_table(ablation))
    out: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    out["ablation"] = ablation
    if not args.ablation_only:
        engine = engine_rows(args.layers, args.batch, args.width, args.repeats)
        memory = memory_rows(args.layers, args.batch, args.width, args.batches)
        print("\n" + markdown_table(engine) + "\n\n" + markdown_table(memory))
        out.update(engine=engine, memory=memory)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
