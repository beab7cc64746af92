"""How sure a CKA value is, and how large: bootstrap intervals and a permutation null.

Both work on the per-batch HSIC1 terms the engine computes anyway (``functional``), so neither
reruns a forward pass.

**Bootstrap.** Minibatch CKA over a sweep of B batches is a ratio of sums,
CKA_ij = Σ_b c_ij^b / sqrt(Σ_b a_i^b · Σ_b d_j^b), with c, a, d the HSIC1 cross and self terms
of batch b. Its batches are random, independent draws of images, so resampling them with
replacement (Efron & Tibshirani 1993, ch. 6) gives the sampling distribution of the estimate:
a replicate weights each batch's terms by how often it was drawn. With several sweeps (the
reported value is their mean) the resampling has two levels: sweeps are drawn with replacement,
then each drawn sweep's batches (a hierarchical or "cases" bootstrap, Davison & Hinkley 1997,
sec. 3.8). Percentile intervals of the replicates (Efron & Tibshirani, ch. 13) are reported;
the unit resampled is the batch, so a sweep of few batches gives a coarse interval.

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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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
    """The draws of a two-level bootstrap, explicit (so a test can give its own).

    Attributes:
        sweeps: (R, S) long: replicate r's k-th draw is sweep ``sweeps[r, k]``.
        counts: (R, S, B) float64: how often that draw takes each of the sweep's batches
            (zero beyond the sweep's own batch count; B the largest count).
    """

    sweeps: Tensor
    counts: Tensor


def draw_resamples(batches: Sequence[int], replicates: int, seed: int) -> Resamples:
    """Sweeps drawn with replacement, then each drawn sweep's batches with replacement.

    Args:
        batches: The batch count of each sweep.
        replicates: R.
        seed: Seed of the draws (the same seed gives the same draws).
    """
    generator = torch.Generator().manual_seed(seed)
    count = len(batches)
    sweeps = torch.randint(count, (replicates, count), generator=generator)  # (R, S)
    counts = torch.zeros(replicates, count, max(batches), dtype=torch.float64)
    for k in range(count):
        size = torch.tensor(batches)[sweeps[:, k]]  # (R,): the drawn sweep's batch count
        picks = (torch.rand(replicates, max(batches), generator=generator) * size[:, None]).long()
        taken = torch.arange(max(batches))[None, :] < size[:, None]  # (R, B): draws that count
        counts[:, k].scatter_add_(1, picks, taken.to(torch.float64))
    return Resamples(sweeps, counts)


def bootstrap_replicates(sweeps: Sequence[BatchTerms], draws: Resamples) -> Tensor:
    """Bootstrap replicates of the mean-over-sweeps CKA matrix.

    Args:
        sweeps: Each sweep's per-batch terms.
        draws: The resamples (``draw_resamples``).

    Returns:
        (R, La, Lb) float64: per replicate, the mean of its drawn sweeps' CKA matrices, each
        computed from its drawn batches.
    """
    replicates, count = draws.sweeps.shape
    total = torch.zeros(replicates, *sweeps[0].cross.shape[1:], dtype=torch.float64)
    for k in range(count):  # the k-th draw of every replicate
        for s, sweep in enumerate(sweeps):
            rows = torch.nonzero(draws.sweeps[:, k] == s).flatten()
            if len(rows):
                total[rows] += sweep.cka(draws.counts[rows, k, : len(sweep)])
    return total / count


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
        std: (La, Lb) their std (ddof 1).
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
    std = null.std(dim=0, correction=1) if len(null) > 1 else torch.zeros_like(mean)
    exceed = (null >= observed).sum(dim=0).to(torch.float64)
    p_value = (1.0 + exceed) / (len(null) + 1.0)
    nan = torch.isnan(observed) | torch.isnan(null).any(dim=0)
    p_value = torch.where(nan, torch.full_like(p_value, float("nan")), p_value)
    return NullSummary(mean, std, (observed - mean) / std, p_value)


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


def batch_permutations(count: int, n: int, seed: int, batch: int) -> Tensor:
    """(count, n) permutations for one batch, a function of (seed, batch) only.

    Every process of a distributed sweep draws the same permutations for the same batch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(count)])


#: The per-cell arrays a calibrated result holds, each (La, Lb).
CELL_KEYS = ("ci_low", "ci_high", "null_mean", "null_std", "z_score", "p_value")


def calibrate(
    sweeps: Sequence[SweepSummary], replicates: int, level: float, seed: int
) -> dict[str, np.ndarray]:
    """The calibration arrays of a comparison from its sweeps (empty when none was asked for).

    Args:
        sweeps: Every sweep's summary; the reported matrix is the mean of theirs.
        replicates: Bootstrap replicates R (0: no interval).
        level: Interval coverage, e.g. 0.95.
        seed: Seed of the resampling.

    Returns:
        ``ci_low``/``ci_high`` and ``bootstrap_diagonal`` (R, L) with replicates (the diagonal
        when the matrix is square: what suggest-split reads), ``null_mean``, ``null_std``,
        ``z_score`` and ``p_value`` with a null; float64 NumPy arrays.
    """
    observed = torch.stack([s.matrix.cpu() for s in sweeps]).mean(dim=0)  # (La, Lb)
    out: dict[str, Tensor] = {}
    batches = [s.batches for s in sweeps if s.batches is not None]
    if replicates and batches:
        cpu = [BatchTerms(b.cross.cpu(), b.self_a.cpu(), b.self_b.cpu()) for b in batches]
        draws = draw_resamples([len(b) for b in cpu], replicates, seed)
        boot = bootstrap_replicates(cpu, draws)  # (R, La, Lb)
        out["ci_low"], out["ci_high"] = percentile_interval(boot, observed, level)
        if boot.shape[-1] == boot.shape[-2]:
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
    return {k: v.numpy() for k, v in out.items()}
