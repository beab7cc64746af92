"""Functional CKA: exact full-batch CKA of two representations and the batched layer-pair terms.

``batch_hsic_terms`` is the engine's core: for La x Lb layer pairs it needs one matrix product of
the stacked centred kernel matrices, ``vec(U(K_a)) @ vec(U(K_b))ᵀ``, instead of La·Lb traces.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ckascope.errors import InputError, NumericalError
from ckascope.kernels import (
    center_gram,
    centered_gram,
    check_kernel,
    cka_from_hsic,
    kernel_from_gram,
    ucenter_gram,
)
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
    ka: Tensor, kb: Tensor, *, debiased: bool = True, overwrite: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """HSIC of every layer pair of one batch from one matrix product.

    Args:
        ka: (La, n, n) float64 kernel matrices of side a.
        kb: (Lb, n, n) float64 kernel matrices of side b, same examples.
        debiased: Unbiased HSIC1 (U-centring) or biased HSIC0 (double centring).
        overwrite: U-centre ``ka`` and ``kb`` in place (the caller's copies, no longer needed).

    Returns:
        cross (La, Lb) = HSIC(K_i, L_j), self_a (La,) = HSIC(K_i, K_i), self_b (Lb,).
    """
    n = ka.shape[-1]
    if debiased:
        ca, cb = ucenter_gram(ka, inplace=overwrite), ucenter_gram(kb, inplace=overwrite)
        scale = 1.0 / (n * (n - 3))
    else:
        ca, cb = center_gram(ka), center_gram(kb)
        scale = 1.0 / (n - 1) ** 2
    # Flattened, all pairs are one matrix product; the full n² (rather than the symmetric upper
    # triangle) is faster, as gathering a triangle costs more memory traffic than it saves.
    va, vb = ca.flatten(1), cb.flatten(1)  # (La, n²), (Lb, n²)
    cross = (va @ vb.T) * scale
    return (
        cross,
        torch.linalg.vecdot(va, va, dim=1) * scale,
        torch.linalg.vecdot(vb, vb, dim=1) * scale,
    )


def warn_degenerate(self_terms: Tensor, names: Sequence[str], side: str) -> None:
    """Warns, naming the layers, when HSIC(K, K) is not positive (their CKA becomes NaN)."""
    bad = [names[i] for i in torch.nonzero(~(self_terms > 0)).flatten().tolist()]
    if bad:
        warnings.warn(
            f"HSIC(K, K) <= 0 or NaN for {len(bad)} layer(s) of side {side}: "
            f"{', '.join(bad)}; their CKA is NaN (constant or degenerate representations)",
            RuntimeWarning,
            stacklevel=3,
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
