"""How sure a CKA value is, and how large: bootstrap intervals and a permutation null.

Both work on the per-batch HSIC1 terms the engine computes anyway (``functional``), so neither
reruns a forward pass.

**Bootstrap.** Minibatch CKA over a sweep of B batches is a ratio of sums,
CKA_ij = Σ_b c_ij^b / sqrt(Σ_b a_i^b · Σ_b d_j^b), with c, a, d the HSIC1 cross and self terms
of batch b. Its batches are random, independent draws of images, so resampling them with
replacement (Efron & Tibshirani 1993, ch. 6) gives the sampling distribution of the estimate:
a replicate weights each batch's terms by how often it was drawn, and the percentile interval
of the replicates (Efron & Tibshirani, ch. 13) is reported.

With S sweeps the reported value is their mean, and how much the mean varies depends on how
many images the sweeps share. Each sweep draws n images from a pool of N, so two sweeps share
about a fraction f = n / N of them (f = 1: the same images, batched anew). With sweep estimates
of variance σ² correlated by about f, Var(mean) ≈ σ² (f + (1 - f) / S) = σ² / S_eff, where
S_eff = S / (1 + (S - 1) f) is the number of independent sweeps they are worth (Kish's design
effect, 1 + (S - 1) ρ). A replicate therefore draws m = B · S_eff of the S·B batches of all
sweeps, with replacement (an m-out-of-n bootstrap, Bickel, Götze & van Zwet 1997): one sweep's
worth when the sweeps re-batch the same images (averaging them removes no sampling error), all
of them when they share almost none. Resampling each sweep separately and averaging would
shrink the spread by √S even for identical sweeps; resampling sweeps and then their batches
would count the within-sweep variance twice (Davison & Hinkley 1997, sec. 3.8). The batch is
the unit: fewer than ``MIN_BATCHES`` give no interval, and a few give a coarse one.

**Permutation null.** Shuffling which image of side b goes with which image of side a within a
batch (K_b -> P K_b Pᵀ) breaks the correspondence while keeping each side's own geometry: CKA
of the shuffled pairs is the chance level of this layer pair on these images and this model,
which wide or deep layers push above zero (Murphy et al. 2024; Gröger et al. 2026). Every
batch gets N fresh permutations; replicate t sums each batch's t-th permuted cross terms. Only
the cross terms change (the self terms are invariant), so a replicate costs one product of the
kernel matrices, not a forward pass. Reported per cell: the null's mean and std, a calibrated
score z = (observed - null mean) / null std (the standardised effect size of a permutation
test, Gröger et al. 2026's calibration in its z-score form), and the p-value
(1 + #{null >= observed}) / (N + 1), which counts the observed pairing as one of the
permutations and so is never zero (Phipson & Smyth 2010).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ckascope.errors import InputError, warn
from ckascope.functional import packed_stats
from ckascope.kernels import cka_from_hsic
from ckascope.packing import BlockLayout, unpack


@dataclass(frozen=True)
class BatchTerms:
    """The HSIC1 terms of every batch of one sweep, in batch order (float64, weighted).

    Attributes:
        cross: (B, La, Lb) cross terms.
        self_a: (B, La) self terms of side a.
        self_b: (B, Lb) self terms of side b.
    """

    cross: Tensor
    self_a: Tensor
    self_b: Tensor

    def __len__(self) -> int:
        return len(self.cross)

    def cka(self, counts: Tensor) -> Tensor:
        """CKA of resampled sweeps: ``counts`` (R, B) draws per batch -> (R, La, Lb)."""
        counts = counts.to(self.cross)
        cross = torch.einsum("rb,bij->rij", counts, self.cross)
        return cka_from_hsic(cross, counts @ self.self_a, counts @ self.self_b)


@dataclass(frozen=True)
class SweepSummary:
    """What one sweep gives: its CKA matrix and, when asked for, its calibration data.

    Attributes:
        matrix: (La, Lb) float64 CKA.
        batches: Every batch's terms, in batch order (for the bootstrap), else None.
        null: (N, La, Lb) CKA of the N permutation replicates, else None.
    """

    matrix: Tensor
    batches: BatchTerms | None = None
    null: Tensor | None = None


@dataclass(frozen=True)
class Resamples:
    """The draws of a bootstrap, explicit (so a test can give its own).

    Attributes:
        counts: (R, B) float64: how often replicate r takes each of the B pooled batches.
    """

    counts: Tensor


#: Fewer batches than this (over all sweeps) give no bootstrap interval.
MIN_BATCHES = 2
#: Fewer batches than this per replicate give a coarse bootstrap (docs/calibration.md): too
#: few distinct resamples to judge how stable a choice made from it is.
FEW_BATCHES = 10


def effective_draws(batches: Sequence[int], overlap: float) -> int:
    """m, the batches a replicate draws: a sweep's batches times the sweeps' worth ``S_eff``.

    Args:
        batches: The batch count of each of the S sweeps.
        overlap: f, the share of images two sweeps have in common (1: the same images).
    """
    sweeps = len(batches)
    worth = sweeps / (1 + (sweeps - 1) * overlap)  # S_eff
    return max(1, round(sum(batches) / sweeps * worth))


def draw_resamples(pooled: int, draws: int, replicates: int, seed: int) -> Resamples:
    """``replicates`` draws of ``draws`` batches out of ``pooled``, with replacement, seeded."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(pooled, (replicates, draws), generator=generator)  # (R, m)
    counts = torch.zeros(replicates, pooled, dtype=torch.float64)
    return Resamples(counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64)))


def pool(sweeps: Sequence[BatchTerms]) -> BatchTerms:
    """Every sweep's batches as one set, on the CPU."""
    return BatchTerms(
        *(torch.cat([getattr(b, k).cpu() for b in sweeps]) for k in ("cross", "self_a", "self_b"))
    )


def bootstrap_replicates(batches: BatchTerms, draws: Resamples) -> Tensor:
    """(R, La, Lb) float64: the CKA of each replicate's drawn batches (ratio of weighted sums)."""
    return batches.cka(draws.counts)


def percentile_interval(replicates: Tensor, point: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """The percentile interval at ``level`` of replicates (R, ...), widened to hold ``point``.

    With few batches the replicates of a ratio can be skewed enough that the estimate itself
    falls outside their central ``level``; the interval then reaches it (NaN cells stay NaN).
    """
    tail = (1.0 - level) / 2
    q = torch.tensor([tail, 1.0 - tail], dtype=replicates.dtype)
    low, high = torch.nanquantile(replicates, q, dim=0)
    return torch.minimum(low, point), torch.maximum(high, point)


@dataclass(frozen=True)
class NullSummary:
    """Per cell, the permutation null of a CKA matrix and where the observed value lies in it.

    Attributes:
        mean: (La, Lb) mean of the null replicates.
        std: (La, Lb) their std (ddof 1; NaN for one replicate).
        z_score: (La, Lb) (observed - mean) / std.
        p_value: (La, Lb) (1 + #{null >= observed}) / (N + 1).
    """

    mean: Tensor
    std: Tensor
    z_score: Tensor
    p_value: Tensor


def null_summary(observed: Tensor, null: Tensor) -> NullSummary:
    """Summarises null replicates (N, La, Lb) against the observed matrix (La, Lb)."""
    mean = null.mean(dim=0)
    # ddof 1 needs two replicates: one gives no spread to estimate (NaN, as documented), not 0
    unknown = torch.full_like(mean, float("nan"))
    std = null.std(dim=0, correction=1) if len(null) > 1 else unknown
    exceed = (null >= observed).sum(dim=0).to(torch.float64)
    p_value = (1.0 + exceed) / (len(null) + 1.0)
    nan = torch.isnan(observed) | torch.isnan(null).any(dim=0)
    p_value = torch.where(nan, torch.full_like(p_value, float("nan")), p_value)
    spread = torch.where(std > 0, std, torch.full_like(std, float("nan")))  # no spread: no z
    return NullSummary(mean, std, (observed - mean) / spread, p_value)


#: The p-value the permutation null is read at (the heatmap circles the cells above it).
ALPHA = 0.05


def smallest_p_value(permutations: int) -> float:
    """1 / (M + 1): the smallest p-value M permutations give (the observed pairing counts)."""
    return 1.0 / (permutations + 1)


def coarse_null_note(permutations: int, alpha: float = ALPHA) -> str | None:
    """What to know when M permutations cannot give any cell a p-value <= ``alpha``, else None.

    Every p-value is at least 1 / (M + 1), so fewer than 1 / alpha - 1 permutations (19 for
    0.05) can never reach the level, whatever the data.
    """
    smallest = smallest_p_value(permutations)
    if permutations < 1 or smallest <= alpha:
        return None
    need = math.ceil(1.0 / alpha) - 1
    return (
        f"with {permutations} permutation(s) the smallest possible p-value is "
        f"1/{permutations + 1} = {smallest:.3g}: no cell can reach p <= {alpha:g}. "
        f"Hint: --permutations {need} or more (e.g. 100) for p-values that can"
    )


def coarse_bootstrap_note(replicates: int, ci: float) -> str | None:
    """What to know when B replicates leave a ``ci`` percentile interval's tails empty, else None.

    Each tail holds B (1 - ci) / 2 replicates; under one, the interval is just the range of the
    replicates (zero width for B = 1), whatever coverage it is labelled with.
    """
    need = math.ceil(round(2.0 / (1.0 - ci), 9))  # 2 / 0.1 is 20.000000000000004
    if replicates < 1 or replicates >= need:
        return None
    return (
        f"with {replicates} bootstrap replicate(s) the {ci:.0%} interval has less than one "
        "replicate in each tail: it is only their range, not a calibrated interval. Hint: "
        f"--bootstrap {need} or more (e.g. 1000)"
    )


def permuted_cross_terms(pa: Tensor, pb: Tensor, layout: BlockLayout, perms: Tensor) -> Tensor:
    """HSIC1 cross terms with side b's examples shuffled, one shuffle per row of ``perms``.

    HSIC1(K, P L Pᵀ) in Song et al.'s form (``functional.packed_hsic1_terms``): L's diagonal and
    row sums are permuted with it, its total sum is not, so only <K, P L Pᵀ> needs the whole
    matrices.

    Args:
        pa: (La, size) packed float64 kernel matrices of side a.
        pb: (Lb, size) packed float64 kernel matrices of side b, same examples.
        layout: Their packing; n = layout.n >= 4.
        perms: (N, n) permutations of range(n).

    Returns:
        (N, La, Lb) float64.
    """
    n = layout.n
    a, b = packed_stats(pa, layout), packed_stats(pb, layout)
    sa, sb = a.rows.sum(dim=-1), b.rows.sum(dim=-1)  # 1ᵀK̃1: (L,), permutation invariant
    fixed = torch.outer(sa, sb) / ((n - 1) * (n - 2))
    ka, kb = unpack(pa, layout).flatten(1), unpack(pb, layout)  # (La, n²), (Lb, n, n)
    out = torch.empty(len(perms), len(pa), len(pb), dtype=torch.float64, device=pa.device)
    for t, p in enumerate(perms):
        shuffled = kb[:, p[:, None], p[None, :]].flatten(1)  # (Lb, n²): P L Pᵀ, one gather
        inner = ka @ shuffled.T  # (La, Lb)
        diag, rows = b.diag[:, p], b.rows[:, p]
        out[t] = inner - a.diag @ diag.T + fixed - (2.0 / (n - 2)) * (a.rows @ rows.T)
    return out / (n * (n - 3))


def batch_permutations(
    count: int, n: int, seed: int, batch: int, device: torch.device | str = "cpu"
) -> Tensor:
    """(count, n) permutations for one batch, a function of (seed, batch, device type) only.

    Every process of a distributed sweep draws the same permutations for the same batch. They
    are drawn on ``device`` (its own generator), so a GPU sweep never waits for a copy.
    """
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)
    keys = torch.rand(count, n, generator=generator, device=device)
    return torch.argsort(keys, dim=1)


#: The per-cell arrays a calibrated result holds, each (La, Lb).
CELL_KEYS = ("ci_low", "ci_high", "null_mean", "null_std", "z_score", "p_value")


def calibrate(
    sweeps: Sequence[SweepSummary],
    replicates: int,
    level: float,
    seed: int,
    overlap: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The calibration arrays of a comparison from its sweeps (empty when none was asked for).

    Args:
        sweeps: Every sweep's summary; the reported matrix is the mean of theirs.
        replicates: Bootstrap replicates R (0: no interval).
        level: Interval coverage, e.g. 0.95.
        seed: Seed of the resampling.
        overlap: The share of images two sweeps have in common (1: the same images).

    Returns:
        The arrays: ``ci_low``/``ci_high`` and ``bootstrap_diagonal`` (R, L) with replicates
        (the diagonal when the matrix is square: what suggest-split reads), ``null_mean``,
        ``null_std``, ``z_score`` and ``p_value`` with a null (float64 NumPy); and what the
        result records of how they were made. Fewer than ``MIN_BATCHES`` batches give NaN
        intervals, said by the caller (``bootstrap_gap``), which knows it before the sweep.
    """
    observed = torch.stack([s.matrix.cpu() for s in sweeps]).mean(dim=0)  # (La, Lb)
    out: dict[str, Tensor] = {}
    info: dict[str, Any] = {}
    kept = [s.batches for s in sweeps if s.batches is not None]
    if replicates and kept:
        boot, info = _bootstrap(kept, replicates, seed, overlap)
        out["ci_low"], out["ci_high"] = _interval(boot, observed, level)
        if boot is not None and boot.shape[-1] == boot.shape[-2]:
            out["bootstrap_diagonal"] = boot.diagonal(dim1=-2, dim2=-1)  # (R, L)
    nulls = [s.null.cpu() for s in sweeps if s.null is not None]
    if nulls:
        summary = null_summary(observed, torch.stack(nulls).mean(dim=0))  # (N, La, Lb)
        out.update(
            null_mean=summary.mean,
            null_std=summary.std,
            z_score=summary.z_score,
            p_value=summary.p_value,
        )
    return {k: v.numpy() for k, v in out.items()}, info


def _interval(boot: Tensor | None, observed: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """The percentile interval of replicates (``percentile_interval``); NaN without any."""
    if boot is None:
        return torch.full_like(observed, float("nan")), torch.full_like(observed, float("nan"))
    return percentile_interval(boot, observed, level)


def _bootstrap(
    kept: Sequence[BatchTerms], replicates: int, seed: int, overlap: float
) -> tuple[Tensor | None, dict[str, Any]]:
    """(R, La, Lb) replicates (None without enough batches) and how they were drawn."""
    batches = pool(kept)
    if len(batches) < MIN_BATCHES:  # nothing to resample, and no R x La x Lb of NaN to hold
        return None, {"bootstrap_draws": 0}
    draws = effective_draws([len(b) for b in kept], overlap)
    boot = bootstrap_replicates(batches, draw_resamples(len(batches), draws, replicates, seed))
    _warn_lost(boot)
    info = {"bootstrap_draws": draws, "bootstrap_pool": len(batches), "sweep_overlap": overlap}
    return boot, info


def bootstrap_gap(batches: int) -> str | None:
    """The note for a bootstrap over ``batches`` (every sweep's and process's), when too few.

    Known from the plan of the sweep (``compare``), so the command line says it at the start.
    """
    if batches >= MIN_BATCHES:
        return None
    return (
        f"{batches} batch(es) cannot be bootstrapped: no interval. Hint: more images or a "
        "smaller --batch-size"
    )


def memory_bytes() -> int:
    """This machine's physical memory, where the calibration's matrices end up (float64, CPU)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a modest machine's
        return 16 * 2**30


def calibration_matrices(bootstrap: int, permutations: int, repeats: int) -> int:
    """About how many (La, Lb) float64 matrices the calibration holds at once, at its peak.

    The larger of its two phases: while the bootstrap runs, each sweep's permutation null
    (S nulls of N matrices) and its R replicates, their ratio's terms and a sorted copy for the
    percentiles (3 R); then the nulls' list, their stack and mean (2 S + 1 nulls) beside the
    R replicates kept.
    """
    during = repeats * permutations + 3 * bootstrap
    after = (2 * repeats + 1) * permutations + bootstrap
    return max(during, after)


def check_calibration_size(
    bootstrap: int, permutations: int, repeats: int, layers_a: int, layers_b: int
) -> None:
    """Refuses a calibration whose matrices would not fit in this machine's memory.

    A run that would fail at its end, after every batch, is refused before its first.

    Raises:
        InputError: Naming the size, and the largest count of the larger share that fits.
    """
    per_matrix, limit = 8 * layers_a * layers_b, memory_bytes()
    need = per_matrix * calibration_matrices(bootstrap, permutations, repeats)
    if need <= limit:
        return
    flag, fit = _largest_fit(bootstrap, permutations, repeats, limit // per_matrix)
    fewer = f"{flag} {fit} or fewer, " if fit else ""
    counts = (("--bootstrap", bootstrap), ("--permutations", permutations))
    asked = " and ".join(f"{name} {count}" for name, count in counts if count)
    raise InputError(
        f"{asked} over {repeats} sweep(s) of {layers_a} x {layers_b} layer pairs would hold "
        f"about {need / 2**30:.1f} GiB of matrices at once, more than this machine's "
        f"{limit / 2**30:.1f} GiB. Hint: {fewer}fewer --repeats, or fewer layers (--layers "
        "stages has the fewest)"
    )


def _largest_fit(bootstrap: int, permutations: int, repeats: int, room: int) -> tuple[str, int]:
    """The option holding the larger share of ``room`` matrices, and its largest count that fits."""
    if permutations * (2 * repeats + 1) >= 3 * bootstrap:
        fit = min((room - 3 * bootstrap) // repeats, (room - bootstrap) // (2 * repeats + 1))
        return "--permutations", max(0, fit)
    fit = min((room - repeats * permutations) // 3, room - (2 * repeats + 1) * permutations)
    return "--bootstrap", max(0, fit)


def _warn_lost(boot: Tensor) -> None:
    """Warns when replicates are NaN (a resampled self term not positive) in finite cells."""
    lost = torch.isnan(boot) & torch.isfinite(boot).any(dim=0)
    if bool(lost.any()):
        share = float(lost.sum(dim=0).max()) / len(boot)
        warn(
            f"up to {100 * share:.1f} % of the bootstrap replicates of some cells are NaN (a "
            "resampled HSIC(K, K) was not positive) and left out of their intervals"
        )
