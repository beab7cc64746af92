"""Kernel matrices and HSIC estimators as small pure functions.

Every function is batched over leading dimensions: a Gram matrix has shape (..., n, n) and a
feature matrix (..., n, p). The formulas are those of docs/cka.md:

- linear kernel K = X Xᵀ; RBF kernel K_ij = exp(-D²_ij / (2σ²)), σ² = f² · median(D²) over all n²
  entries with NumPy's even-count rule;
- HSIC0(K, L) = tr(K H L H) / (n-1)² (biased), HSIC1(K, L) = <U(K), U(L)> / (n(n-3)) (unbiased,
  Song et al. 2012, in the U-centred form of Székely & Rizzo).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

from ckascope.errors import InputError
from ckascope.packing import BlockLayout, packed_blocks
from ckascope.vocab import KERNELS, Kernel

#: The CUDA ops whose float32 precision ``ieee_fp32`` controls: new-API backend, legacy flag.
_TF32_OPS = {
    "matmul": (lambda: torch.backends.cuda.matmul, "cublas"),
    "conv": (lambda: getattr(torch.backends.cudnn, "conv"), "cudnn"),  # noqa: B009 (not in stubs)
}


@contextmanager
def ieee_fp32(*ops: str) -> Iterator[None]:
    """Turns TF32 off for the named CUDA ops ("matmul", "conv") inside the block, then restores.

    TF32 keeps 10 mantissa bits (relative error ~1e-3), three orders of magnitude above the 1e-6
    the Grams need; TF32 convolutions put the same error into the activations themselves.
    torch >= 2.9 has ``fp32_precision`` per op, whose getter returns the resolved value and
    which must not be mixed with the legacy ``allow_tf32`` flags (that raises): only it is used,
    and an op that was inheriting its parent's value is given ``"none"`` (inherit) back, so a
    later global change still reaches it (the API cannot tell an inherited value from the same
    value set explicitly: the latter also comes back as inheriting). Older torch: the
    ``allow_tf32`` flags.
    """
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        parent = torch.backends.cudnn.fp32_precision  # the "cuda" level both ops inherit from
        backends = [_TF32_OPS[op][0]() for op in ops]
        old = [b.fp32_precision for b in backends]
        for b in backends:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, value in zip(backends, old, strict=True):
                b.fp32_precision = "none" if value == parent else value
        return
    with _legacy_tf32_off(ops):
        yield


@contextmanager
def _legacy_tf32_off(ops: tuple[str, ...]) -> Iterator[None]:
    flags = {
        "cublas": (torch.backends.cuda.matmul, "allow_tf32"),
        "cudnn": (torch.backends.cudnn, "allow_tf32"),
    }
    targets = [flags[_TF32_OPS[op][1]] for op in ops]
    old = [getattr(obj, name) for obj, name in targets]
    for obj, name in targets:
        setattr(obj, name, False)
    try:
        yield
    finally:
        for (obj, name), value in zip(targets, old, strict=True):
            setattr(obj, name, value)


def check_kernel(kernel: str, sigma_frac: float) -> None:
    """Raises InputError for an unknown kernel name or a non-positive RBF bandwidth fraction."""
    if kernel not in KERNELS:
        raise InputError(f"unknown kernel {kernel!r}. Hint: use one of {', '.join(KERNELS)}")
    if not 0 < sigma_frac < math.inf:
        raise InputError(
            f"sigma_frac must be a finite number > 0, got {sigma_frac}. Hint: the paper uses 0.5-1"
        )


def center_features(x: Tensor) -> Tensor:
    """Subtracts the mean example: (..., n, p) -> (..., n, p).

    Both HSIC estimators are invariant to it, and it removes the cancellation that makes
    float32 Grams of deep-layer features lose all their digits.
    """
    return x - x.mean(dim=-2, keepdim=True)


def exact_products(device: str) -> AbstractContextManager[None]:
    """Float32 matrix products without a caller's autocast, and without TF32 on CUDA.

    A caller's autocast would run them in bf16/fp16 (relative error 2-3e-3; fp16 overflows past
    65504, which a ResNet's early layers reach at 224 px), and TF32 keeps 10 mantissa bits.
    ``ieee_fp32`` governs CUDA's TF32 only, so on a CPU without autocast the two contexts change
    nothing and a ``nullcontext`` stands in for them: entering them (or any generator-based
    context) costs ~11 us, and a 50-layer MLP takes 100 Grams a batch.
    """
    if device == "cpu" and not torch.is_autocast_enabled(device):
        return nullcontext()
    return _exact_products(device)


@contextmanager
def _exact_products(device: str) -> Iterator[None]:
    with ieee_fp32("matmul"), torch.autocast(device, enabled=False):
        yield


def linear_gram(x: Tensor) -> Tensor:
    """Linear kernel matrix: (..., n, p) -> (..., n, n), in x's dtype even under autocast."""
    with exact_products(x.device.type):
        return x @ x.transpose(-1, -2)


#: Bytes of features a CPU centres at a time in ``packed_gram`` (n x width values): 4 MiB
#: (8192 columns of float32 at n = 128) was the fastest of 1-16 MiB on the 2-core AMD EPYC VM.
CENTER_CHUNK_BYTES = 4 * 2**20


def centered_gram(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Linear Gram (n, n) of the column-centred, flattened features x (n, ...), in ``dtype``.

    The whole matrix, for callers that want one (``packed_gram`` with depth 0).
    """
    n = x.shape[0]
    if n == 0:  # no layout holds an empty matrix
        return torch.zeros(0, 0, dtype=dtype, device=x.device)
    return packed_gram(x, dtype, BlockLayout(n)).view(n, n)


def packed_gram(x: Tensor, dtype: torch.dtype, layout: BlockLayout) -> Tensor:
    """Linear Gram of the column-centred, flattened features of one layer, packed.

    Args:
        x: Features (n, ...) of any float dtype; everything after dim 0 is flattened.
        dtype: float32 or float64, the precision of the products.
        layout: The packing, ``layout.n == n``.

    Returns:
        (layout.size,) packed Gram in ``dtype`` (see ``ckascope.packing``).
    """
    packed = torch.empty(layout.size, dtype=dtype, device=x.device)
    gram_into(x, packed_blocks(packed, layout), layout)
    return packed


def centre_width(n: int, p: int, dtype: torch.dtype, device: torch.device) -> int:
    """Columns of an (n, p) layer centred at a time (see ``gram_into``).

    ``CENTER_CHUNK_BYTES`` worth on a CPU, all of them on other devices.
    """
    if device.type != "cpu":
        return max(p, 1)
    return min(
        max(p, 1), max(1, CENTER_CHUNK_BYTES // (max(n, 1) * (torch.finfo(dtype).bits // 8)))
    )


def gram_into(
    x: Tensor,
    blocks: tuple[Tensor, list[Tensor]],
    layout: BlockLayout,
    buffer: Tensor | None = None,
) -> None:
    """Writes the packed Gram of x's centred features into ``blocks``, in their dtype.

    The mean is computed in that dtype: its rounding error is the same vector for every
    example, a shift both HSIC estimators ignore, so even float32 features whose spread is 1e-6
    of their mean keep their digits (see tests/ckascope/test_stability.py). Only the layout's
    blocks are computed (5/8 of the products at depth 2), one batched product per level.

    On a CPU the columns are centred ``CENTER_CHUNK_BYTES`` worth at a time and each centred
    chunk's products added while the chunk is still in cache: the features are read from memory
    once, where centring them whole writes and reads back a copy as large as the layer (100 MB
    for a ResNet's first stage at 224 px and n = 128, where this halves the Gram's time; a CUDA
    device streams that copy faster than it launches the extra kernels).

    Args:
        x: Features (n, ...) of any float dtype; everything after dim 0 is flattened.
        blocks: ``packed_blocks`` views of a packed (layout.size,) float32 or float64 tensor.
        layout: The packing, ``layout.n == n``.
        buffer: Room for the centred chunk, n x ``centre_width`` values of the blocks' dtype,
            reused by a caller that takes many Grams on a CPU (a fresh one per layer can cost a
            round trip to the system's allocator and its page faults; CUDA's caching allocator
            has no such cost, and there the room would be a whole layer).
    """
    flat = flat_features(x.detach())  # (n, p)
    n, p = flat.shape
    dtype = blocks[0].dtype
    width = centre_width(n, p, dtype, flat.device)
    with exact_products(flat.device.type):
        for start in range(0, max(p, 1), width):  # p = 0: one empty chunk, a zero Gram
            chunk = (flat if width >= p else flat[:, start : start + width]).to(dtype)
            if buffer is None:
                centred = chunk - chunk.mean(dim=0)
            else:
                room = buffer[: chunk.numel()].view(chunk.shape)
                centred = torch.sub(chunk, chunk.mean(dim=0), out=room)
            _add_block_products(centred, blocks, layout, start > 0)


def flat_features(x: Tensor) -> Tensor:
    """Features (n, ...) as (n, p), their columns in memory order: a view whenever one exists.

    A Gram (and the column centring before it) does not depend on the order of the columns, so
    a channels_last feature map (n, C, H, W), whose memory is (n, H, W, C), is flattened as
    that: a view, where ``reshape`` in the logical order would copy the whole layer. Only the
    order of the float sums changes (last-bit differences).
    """
    n = x.shape[0]
    if x.is_contiguous() or x.ndim < 3:
        return x.reshape(n, -1)
    order = sorted(range(1, x.ndim), key=lambda d: x.stride(d), reverse=True)
    memory = x.permute(0, *order)  # the dimensions as they lie in memory
    return memory.view(n, -1) if memory.is_contiguous() else x.reshape(n, -1)


def _add_block_products(
    xc: Tensor, blocks: tuple[Tensor, list[Tensor]], layout: BlockLayout, accumulate: bool
) -> None:
    """Writes (or adds) the layout's blocks of xc xcᵀ, xc (n, w), into the packed views."""
    leaves, uppers = blocks
    rows = xc.view(layout.leaves, layout.leaf, -1)  # (leaves, leaf, w)
    _bmm_into(leaves, rows, rows, accumulate)
    for upper, (_, count, side) in zip(uppers, layout.spans, strict=True):
        halves = xc.view(count, 2, side, -1)  # (count, 2, side, w): a parent's two halves
        _bmm_into(upper, halves[:, 0], halves[:, 1], accumulate)


def _bmm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """Writes a bᵀ into out, or adds it, for (c, r, w) x (c, r, w) -> (c, r, r)."""
    if accumulate:
        out.baddbmm_(a, b.mT)
    else:
        torch.bmm(a, b.mT, out=out)


def sq_dists_from_gram(gram: Tensor) -> Tensor:
    """Squared Euclidean distances from a linear Gram: (..., n, n) -> (..., n, n).

    D²_ij = G_ii + G_jj - 2 G_ij. Rounding can leave tiny negative entries; a squared distance is
    non-negative by definition, so those are set to 0 (and the diagonal to exactly 0).
    """
    sq_norms = gram.diagonal(dim1=-2, dim2=-1)  # (..., n)
    d2 = (sq_norms.unsqueeze(-1) + sq_norms.unsqueeze(-2) - 2 * gram).clamp_min(0)
    d2.diagonal(dim1=-2, dim2=-1).zero_()
    return d2


def sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances between examples: (..., n, p) -> (..., n, n)."""
    return sq_dists_from_gram(linear_gram(center_features(x)))


def numpy_median(values: Tensor) -> Tensor:
    """Median over the last dimension with NumPy's rule: the mean of the two middle values.

    ``torch.median`` returns the lower middle value, and ``torch.quantile`` refuses more than 2²⁴
    elements in older torch releases (n > 4096 examples); ``kthvalue`` has neither problem.

    Args:
        values: (..., m).

    Returns:
        (...,) medians.
    """
    m = values.shape[-1]
    lower = values.kthvalue((m + 1) // 2, dim=-1).values
    if m % 2:
        return lower
    upper = values.kthvalue(m // 2 + 1, dim=-1).values
    return (lower + upper) / 2


def rbf_sigma2(d2: Tensor, sigma_frac: float) -> Tensor:
    """σ² = sigma_frac² · median of all n² squared distances: (..., n, n) -> (...,)."""
    return sigma_frac**2 * numpy_median(d2.flatten(-2))


def rbf_from_sq_dists(d2: Tensor, sigma2: Tensor) -> Tensor:
    """RBF kernel exp(-D² / (2σ²)) from squared distances (..., n, n) and σ² (...,)."""
    return torch.exp(-d2 / (2 * sigma2[..., None, None]))


def rbf_gram(x: Tensor, sigma_frac: float = 1.0) -> Tensor:
    """RBF kernel matrix with the median-heuristic bandwidth: (..., n, p) -> (..., n, n)."""
    d2 = sq_dists(x)
    return rbf_from_sq_dists(d2, rbf_sigma2(d2, sigma_frac))


def kernel_from_gram(
    gram: Tensor, kernel: Kernel, sigma_frac: float = 1.0, sigma2: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Turns linear Grams of centred features into the chosen kernel matrices.

    Args:
        gram: (..., n, n) linear Gram matrices.
        kernel: "linear" (returned as is) or "rbf".
        sigma_frac: RBF bandwidth fraction f.
        sigma2: (...,) fixed RBF bandwidths; None computes them from these Grams.

    Returns:
        The kernel matrices (..., n, n) and the σ² used (None for the linear kernel).
    """
    if kernel == "linear":
        return gram, None
    d2 = sq_dists_from_gram(gram)
    if sigma2 is None:
        sigma2 = rbf_sigma2(d2, sigma_frac)
    return rbf_from_sq_dists(d2, sigma2), sigma2


def center_gram(k: Tensor) -> Tensor:
    """Double centring H K H with H = I - 11ᵀ/n: (..., n, n) -> (..., n, n)."""
    return (
        k
        - k.mean(dim=-1, keepdim=True)
        - k.mean(dim=-2, keepdim=True)
        + k.mean(dim=(-2, -1), keepdim=True)
    )


def ucenter_gram(k: Tensor, *, inplace: bool = False) -> Tensor:
    """U-centring (Székely & Rizzo 2014) of K̃, the kernel matrix with its diagonal zeroed.

    U_ij = K̃_ij - row_i/(n-2) - col_j/(n-2) + total/((n-1)(n-2)) off the diagonal, 0 on it.

    Args:
        k: (..., n, n) kernel matrices, n >= 4.
        inplace: Overwrite ``k`` (saves a copy of L x n x n values per batch).

    Returns:
        (..., n, n) U-centred matrices.
    """
    n = k.shape[-1]
    if n < 4:
        raise InputError(f"the unbiased HSIC needs n >= 4 examples per batch, got {n}")
    u = k if inplace else k.clone()
    u.diagonal(dim1=-2, dim2=-1).zero_()
    row = u.sum(dim=-1, keepdim=True)  # (..., n, 1)
    col = u.sum(dim=-2, keepdim=True)  # (..., 1, n)
    total = row.sum(dim=-2, keepdim=True)  # (..., 1, 1)
    # In place: the matrices are large (L x n x n) and memory traffic is the cost here.
    u.sub_(row, alpha=1 / (n - 2)).sub_(col, alpha=1 / (n - 2)).add_(
        total, alpha=1 / ((n - 1) * (n - 2))
    )
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def hsic0(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 (L is the paper's name)
    """Biased HSIC tr(K H L H) / (n-1)²: two (..., n, n) -> (...,)."""
    n = k.shape[-1]
    return (center_gram(k) * l.transpose(-1, -2)).sum(dim=(-2, -1)) / (n - 1) ** 2


def hsic1(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741 (L is the paper's name)
    """Unbiased HSIC <U(K), U(L)> / (n(n-3)): two (..., n, n) -> (...,), n >= 4."""
    n = k.shape[-1]
    return (ucenter_gram(k) * ucenter_gram(l)).sum(dim=(-2, -1)) / (n * (n - 3))


def cka_from_hsic(cross: Tensor, self_a: Tensor, self_b: Tensor) -> Tensor:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), NaN where a self term is not positive.

    Args:
        cross: (..., La, Lb) cross terms.
        self_a: (..., La) self terms of side a.
        self_b: (..., Lb) self terms of side b.

    Returns:
        (..., La, Lb) CKA values; rows/columns of non-positive (or NaN) self terms are NaN,
        never clamped.
    """
    a, b = self_a[..., :, None], self_b[..., None, :]
    valid = (a > 0) & (b > 0)
    denom = torch.sqrt(a.clamp_min(0) * b.clamp_min(0))
    return torch.where(valid, cross / denom, torch.full_like(cross, float("nan")))
