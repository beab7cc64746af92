"""Independent float64 NumPy reference for CKA, written from the formulas in docs/cka.md.

Deliberately naive: explicit centring matrix H, explicit pairwise differences for the RBF
distances, the explicit Song et al. (2012) formula for HSIC1, np.median. It shares no code with
ckascope.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Array = np.ndarray


def as2d(x: object) -> Array:
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(a.shape[0], -1)


def linear_kernel(x: object) -> Array:
    # Centring the features changes neither HSIC estimator (docs/cka.md) and keeps float64 exact
    # for features whose spread is tiny next to their mean.
    a = as2d(x)
    a = a - a.mean(axis=0)
    gram: Array = a @ a.T
    return gram


def sq_distances(x: object) -> Array:
    a = as2d(x)
    diff = a[:, None, :] - a[None, :, :]
    d2: Array = np.sum(diff * diff, axis=-1)
    return d2


def rbf_kernel(x: object, sigma_frac: float = 1.0, sigma2: float | None = None) -> Array:
    d2 = sq_distances(x)
    if sigma2 is None:
        sigma2 = rbf_sigma2(x, sigma_frac)
    return np.exp(-d2 / (2.0 * sigma2))


def rbf_sigma2(x: object, sigma_frac: float = 1.0) -> float:
    return float(sigma_frac**2 * np.median(sq_distances(x)))


def kernel(x: object, name: str, sigma_frac: float = 1.0) -> Array:
    return linear_kernel(x) if name == "linear" else rbf_kernel(x, sigma_frac)


def hsic0(k: Array, l: Array) -> float:  # noqa: E741
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def hsic1(k: Array, l: Array) -> float:  # noqa: E741
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def hsic1_pairs(ka: Array, kb: Array) -> Array:
    """``hsic1`` of every pair of (La, n, n) and (Lb, n, n) symmetric Grams -> (La, Lb).

    The same Song et al. formula for many layers at once (the benchmarks' 50-layer workloads):
    tr(K̃L̃) is the elementwise sum of the product and 1ᵀK̃L̃1 the dot of the row sums, both
    for symmetric matrices.
    """
    n = ka.shape[-1]
    if n < 4:
        raise ValueError(f"HSIC1 needs n >= 4, got {n}")
    kt, lt = _zero_diagonal(ka), _zero_diagonal(kb)
    trace = kt.reshape(len(kt), -1) @ lt.reshape(len(lt), -1).T
    sums = np.outer(kt.sum(axis=(1, 2)), lt.sum(axis=(1, 2))) / ((n - 1) * (n - 2))
    ones_kl_ones = kt.sum(axis=2) @ lt.sum(axis=2).T
    out: Array = (trace + sums - 2.0 / (n - 2) * ones_kl_ones) / (n * (n - 3))
    return out


def hsic0_pairs(ka: Array, kb: Array) -> Array:
    """``hsic0`` of every pair of (La, n, n) and (Lb, n, n) symmetric Grams -> (La, Lb)."""
    n = ka.shape[-1]
    h = np.eye(n) - np.ones((n, n)) / n
    kc, lc = h @ ka @ h, h @ kb @ h  # tr(KHLH) = <HKH, HLH> for symmetric K, L
    out: Array = (kc.reshape(len(kc), -1) @ lc.reshape(len(lc), -1).T) / (n - 1) ** 2
    return out


def cka_ratio(cross: Array, self_a: Array, self_b: Array) -> Array:
    """HSIC(K,L)/sqrt(HSIC(K,K) HSIC(L,L)); NaN where a self term is not positive (no clamp)."""
    valid = (self_a[:, None] > 0) & (self_b[None, :] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = cross / np.sqrt(np.outer(self_a, self_b))
    return np.where(valid, out, np.nan)


def _zero_diagonal(grams: Array) -> Array:
    out = np.array(grams, dtype=np.float64)
    out[:, np.arange(out.shape[-1]), np.arange(out.shape[-1])] = 0.0
    return out


def cka(
    x: object, y: object, name: str = "linear", debiased: bool = False, sigma_frac: float = 1.0
) -> float:
    k, l = kernel(x, name, sigma_frac), kernel(y, name, sigma_frac)  # noqa: E741
    h = hsic1 if debiased else hsic0
    return float(h(k, l) / np.sqrt(h(k, k) * h(l, l)))


def minibatch_cka(
    batches_a: Sequence[Sequence[object]],
    batches_b: Sequence[Sequence[object]],
    name: str = "linear",
    sigma_frac: float = 1.0,
    weights: Sequence[float] | None = None,
    sigma2_a: Sequence[float] | None = None,
    sigma2_b: Sequence[float] | None = None,
) -> Array:
    """Minibatch CKA: weighted mean HSIC1 over batches, then the ratio.

    batches_a[b][i] is layer i of batch b. Fixed RBF bandwidths can be given per layer.
    """
    num_a, num_b = len(batches_a[0]), len(batches_b[0])
    w = np.ones(len(batches_a)) if weights is None else np.asarray(weights, dtype=np.float64)
    cross = np.zeros((num_a, num_b))
    self_a, self_b = np.zeros(num_a), np.zeros(num_b)

    def kern(x: object, s2: float | None) -> Array:
        if name == "linear":
            return linear_kernel(x)
        return rbf_kernel(x, sigma_frac, s2)

    for wb, fa, fb in zip(w, batches_a, batches_b, strict=True):
        ka = [kern(x, None if sigma2_a is None else sigma2_a[i]) for i, x in enumerate(fa)]
        kb = [kern(y, None if sigma2_b is None else sigma2_b[j]) for j, y in enumerate(fb)]
        for i in range(num_a):
            self_a[i] += wb * hsic1(ka[i], ka[i])
            for j in range(num_b):
                cross[i, j] += wb * hsic1(ka[i], kb[j])
        for j in range(num_b):
            self_b[j] += wb * hsic1(kb[j], kb[j])
    return cross / np.sqrt(np.outer(self_a, self_b))
