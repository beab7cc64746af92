"""Functional CKA: exact full-batch CKA of two representations and the batched layer-pair terms.

``packed_hsic1_terms`` is the engine's core (``batch_hsic_terms`` adds the biased HSIC0): for
La x Lb layer pairs it needs one matrix product of the stacked, packed kernel matrices (their
diagonal and upper blocks, ``ckascope.packing``) plus (L, n) corrections, instead of La·Lb traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ckascope.errors import InputError, NumericalError, warn
from ckascope.kernels import (
    center_gram,
    centered_gram,
    check_kernel,
    cka_from_hsic,
    kernel_from_gram,
)
from ckascope.packing import BlockLayout, packed_blocks
from ckascope.vocab import Kernel

ArrayLike = Tensor | np.ndarray[Any, Any]


def as_features(x: ArrayLike | Any, name: str) -> Tensor:
    """Converts a representation to a float tensor of shape (n, ...), checking its values.

    Args:
        x: An array or tensor whose first dimension indexes examples.
        name: How to call it in error messages.

    Returns:
        The input as a tensor on its own device (floating point, at least float32).
    """
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim < 2:
        raise InputError(
            f"{name} must have shape (n, ...) with one row per example, got shape "
            f"{tuple(t.shape)}. Hint: reshape n scalar features to (n, 1)"
        )
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"{name} contains NaN or Inf values; CKA is undefined for them")
    return t.detach()


def check_batch_size(n: int, debiased: bool) -> None:
    """Raises InputError when a batch is too small for the HSIC estimator."""
    need = 4 if debiased else 2
    if n < need:
        estimator = "unbiased HSIC (debiased CKA)" if debiased else "biased HSIC"
        raise InputError(
            f"the {estimator} needs at least {need} examples, got {n}. Hint: use more images "
            "per batch"
        )


def batch_hsic_terms(
    ka: Tensor, kb: Tensor, *, debiased: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """HSIC of every layer pair of one batch from one matrix product.

    The inputs are only read: a caller may pass Grams it keeps (or a workspace it reuses).

    Args:
        ka: (La, n, n) float64 kernel matrices of side a.
        kb: (Lb, n, n) float64 kernel matrices of side b, same examples.
        debiased: Unbiased HSIC1 or biased HSIC0 (double centring).

    Returns:
        cross (La, Lb) = HSIC(K_i, L_j), self_a (La,) = HSIC(K_i, K_i), self_b (Lb,).
    """
    if debiased:
        return hsic1_terms(ka, kb)
    n = ka.shape[-1]
    va, vb = center_gram(ka).flatten(1), center_gram(kb).flatten(1)  # (La, n²), (Lb, n²)
    scale = 1.0 / (n - 1) ** 2
    return (va @ vb.T) * scale, _sq_norms(va) * scale, _sq_norms(vb) * scale


class KernelStats(NamedTuple):
    """What HSIC1 needs of kernel matrices K (L, n, n) besides <K_a, K_b>, all float64.

    Attributes:
        diag: (L, n) diagonals.
        rows: (L, n) row sums of K̃, K with its diagonal zeroed.
        sq_norm: (L,) <K̃, K̃>.
    """

    diag: Tensor
    rows: Tensor
    sq_norm: Tensor


def packed_stats(packed: Tensor, layout: BlockLayout) -> KernelStats:
    """``KernelStats`` of packed float64 kernel matrices (L, size), in a few batched passes."""
    leaves, uppers = packed_blocks(packed, layout)
    rows = leaves.sum(dim=-1).flatten(-2)  # (L, n): the leaves' share of K1
    for upper, (count, side) in zip(uppers, layout.levels(), strict=True):
        halves = rows.unflatten(-1, (count, 2, side))  # (L, count, 2, side), a view of rows
        halves[..., 0, :] += upper.sum(dim=-1)
        halves[..., 1, :] += upper.sum(dim=-2)  # the mirror image's rows are the columns
    diag = leaves.diagonal(dim1=-2, dim2=-1).flatten(-2)  # (L, n)
    rows -= diag
    twice = packed[:, layout.diag_size :]  # the upper blocks count twice in <K, K>
    sq_norm = _sq_norms(packed) + _sq_norms(twice) - _sq_norms(diag)
    return KernelStats(diag, rows, sq_norm)


def packed_inner(pa: Tensor, pb: Tensor, layout: BlockLayout) -> Tensor:
    """<K_a, K_b> of every pair of packed matrices: (La, size) x (Lb, size) -> (La, Lb)."""
    d = layout.diag_size
    inner = _inner_products(pa[:, :d], pb[:, :d])
    if d < layout.size:
        inner += 2 * _inner_products(pa[:, d:], pb[:, d:])
    return inner


def hsic1_terms(ka: Tensor, kb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``packed_hsic1_terms`` of whole symmetric kernel matrices (La, n, n) and (Lb, n, n).

    They are read whole (depth 0, a view): packing whole matrices costs more than the smaller
    product saves (bench_engine's step 4).
    """
    layout = BlockLayout(ka.shape[-1])
    return packed_hsic1_terms(ka.flatten(1), kb.flatten(1), layout)


def packed_hsic1_terms(
    pa: Tensor, pb: Tensor, layout: BlockLayout
) -> tuple[Tensor, Tensor, Tensor]:
    """HSIC1 of all pairs in Song et al.'s form, equal to <U(K), U(L)> / (n(n-3)).

    tr(K̃L̃) = <K, L> - Σ_i K_ii L_ii and K̃1 = K1 - diag(K), so nothing is U-centred or
    copied: the cost is the one product of the packed matrices (``packed_inner``) plus a few
    batched passes for their statistics (``packed_stats``). Every term is float64 (the inputs
    are). The terms partly cancel, most for kernels far from centred (a Gram of uncentred
    features); for the centred Grams the engine receives, the float32 rounding of the Grams
    themselves (~1e-9 in CKA) stays the larger error (tests/ckascope/test_stability.py).

    Args:
        pa: (La, size) packed float64 kernel matrices (``ckascope.packing``); only read.
        pb: (Lb, size) packed float64 kernel matrices of the same examples; only read.
        layout: Their packing; n = layout.n >= 4.

    Returns:
        cross (La, Lb), self_a (La,), self_b (Lb,).
    """
    n = layout.n
    check_batch_size(n, debiased=True)
    a, b = packed_stats(pa, layout), packed_stats(pb, layout)
    sa, sb = a.rows.sum(dim=-1), b.rows.sum(dim=-1)  # 1ᵀK̃1: (L,)
    c2, c3 = 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
    cross = (
        packed_inner(pa, pb, layout)
        - a.diag @ b.diag.T
        + c2 * torch.outer(sa, sb)
        - c3 * (a.rows @ b.rows.T)
    )
    scale = 1.0 / (n * (n - 3))
    self_a = a.sq_norm + c2 * sa * sa - c3 * _sq_norms(a.rows)
    self_b = b.sq_norm + c2 * sb * sb - c3 * _sq_norms(b.rows)
    return cross * scale, self_a * scale, self_b * scale


def _inner_products(va: Tensor, vb: Tensor, chunks: int = 8) -> Tensor:
    """The product va @ vb.T of (La, m) and (Lb, m) with m >> La, Lb: (La, Lb).

    On a CPU, MKL may run such a product (a tiny output, a long inner dimension) on fewer threads
    than it has; cut into ``chunks`` slices of the inner dimension, one batched product shares
    the work out (step 2 of bench_engine's design steps), and the partial sums add in float64.
    """
    m = va.shape[1]
    if va.device.type != "cpu" or m < 64 * chunks or va.stride(1) != 1 or vb.stride(1) != 1:
        return va @ vb.T
    width = m // chunks
    body = chunks * width
    # Views, not copies: slice c of row l starts at l * row_stride + c * width.
    a = va.as_strided((chunks, len(va), width), (width, va.stride(0), 1))  # (chunks, La, width)
    b = vb.as_strided((chunks, width, len(vb)), (width, 1, vb.stride(0)))  # (chunks, width, Lb)
    return torch.bmm(a, b).sum(dim=0) + va[:, body:] @ vb[:, body:].T


def _sq_norms(v: Tensor) -> Tensor:
    """Squared norms of the rows of v (L, m) -> (L,), without an (L, m) temporary.

    ``vector_norm`` is one vectorised, threaded reduction: 5x faster than ``einsum`` (a batched
    dot) on (50, 40960) float64 here; squaring its root costs a few units in the last place.
    """
    norms: Tensor = torch.linalg.vector_norm(v, dim=-1)
    return norms.square()


def warn_degenerate(self_terms: Tensor, names: Sequence[str], side: str) -> None:
    """Warns, naming the layers, when HSIC(K, K) is not positive (their CKA becomes NaN)."""
    bad = [names[i] for i in torch.nonzero(~(self_terms > 0)).flatten().tolist()]
    if bad:
        warn(
            f"HSIC(K, K) <= 0 or NaN for {len(bad)} layer(s) of side {side}: "
            f"{', '.join(bad)}; their CKA is NaN (constant or degenerate representations)"
        )


def cka_matrix(
    feats_a: Sequence[ArrayLike],
    feats_b: Sequence[ArrayLike],
    *,
    kernel: Kernel = "linear",
    debiased: bool = False,
    sigma_frac: float = 1.0,
) -> Tensor:
    """Exact full-batch CKA of every pair of representations, computed in float64.

    Args:
        feats_a: La representations, each (n, ...).
        feats_b: Lb representations, each (n, ...) over the same n examples.
        kernel: "linear" or "rbf".
        debiased: Use the unbiased HSIC1 (needs n >= 4) instead of HSIC0.
        sigma_frac: RBF bandwidth fraction f (σ² = f² · median D²).

    Returns:
        (La, Lb) float64 CKA matrix; NaN (with a warning) for degenerate representations.
    """
    check_kernel(kernel, sigma_frac)
    xs = [as_features(x, f"feats_a[{i}]") for i, x in enumerate(feats_a)]
    ys = [as_features(y, f"feats_b[{j}]") for j, y in enumerate(feats_b)]
    if not xs or not ys:
        raise InputError("cka_matrix needs at least one representation on each side")
    sizes = {t.shape[0] for t in xs + ys}
    if len(sizes) != 1:
        raise InputError(
            f"all representations must hold the same examples, got example counts "
            f"{sorted(sizes)}. Hint: feed the same images to both sides"
        )
    check_batch_size(sizes.pop(), debiased)
    ka, _ = kernel_from_gram(
        torch.stack([centered_gram(x, torch.float64) for x in xs]), kernel, sigma_frac
    )
    kb, _ = kernel_from_gram(
        torch.stack([centered_gram(y, torch.float64) for y in ys]), kernel, sigma_frac
    )
    cross, self_a, self_b = batch_hsic_terms(ka, kb, debiased=debiased)
    warn_degenerate(self_a, [f"feats_a[{i}]" for i in range(len(xs))], "a")
    warn_degenerate(self_b, [f"feats_b[{j}]" for j in range(len(ys))], "b")
    return cka_from_hsic(cross, self_a, self_b)


def cka(
    x: ArrayLike,
    y: ArrayLike,
    *,
    kernel: Kernel = "linear",
    debiased: bool = False,
    sigma_frac: float = 1.0,
) -> float:
    """Exact CKA of two representations of the same n examples.

    Args:
        x: (n, ...) array or tensor of any float dtype; trailing dims are flattened.
        y: (n, ...) array or tensor.
        kernel: "linear" or "rbf" (σ² = sigma_frac² · median of the squared distances).
        debiased: Use the unbiased HSIC1 of Song et al. 2012 (n >= 4) instead of HSIC0.
        sigma_frac: RBF bandwidth fraction.

    Returns:
        CKA as a Python float in [0, 1] (debiased CKA can be slightly negative); NaN when a
        representation is constant.
    """
    return float(
        cka_matrix([x], [y], kernel=kernel, debiased=debiased, sigma_frac=sigma_frac)[0, 0]
    )
