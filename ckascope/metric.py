"""``MinibatchCKA``: minibatch CKA (Nguyen, Raghu, Kornblith 2021) as a torchmetrics accumulator.

Over k batches, CKA_ij = mean_b HSIC1(K_ib, L_jb) / sqrt(mean_b HSIC1(K_ib, K_ib) · mean_b
HSIC1(L_jb, L_jb)), a ratio of means. The states are float64 sums registered with
``dist_reduce_fx="sum"``, so DDP ranks combine exactly and memory does not grow with k.

Calibration (``ckascope.calibration``): with ``keep_batches`` every batch's terms are also kept
(list states gathered across ranks) for the bootstrap; with ``permutations=N`` every batch also
adds the cross terms of N within-batch shuffles of side b (sum states), the permutation null.
``summary()`` returns the matrix and both, after one gather.

Short batches: with ``weighting="batch"`` (default, the published estimator) every batch counts
once, whatever its size; ``weighting="examples"`` weights each batch's HSIC terms by its example
count n_b, which lowers the influence of a small, noisy last batch. Either way the estimate is
unbiased per batch; the two differ only in how the batches are averaged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, get_args

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ckascope.calibration import (
    BatchTerms,
    SweepSummary,
    batch_permutations,
    permuted_cross_terms,
)
from ckascope.errors import InputError, NumericalError
from ckascope.functional import check_batch_size, packed_hsic1_terms, warn_degenerate
from ckascope.kernels import (
    check_kernel,
    cka_from_hsic,
    kernel_from_gram,
    packed_gram,
    rbf_sigma2,
    sq_dists_from_gram,
)
from ckascope.packing import BlockLayout, pack, packed_blocks, unpack
from ckascope.vocab import Bandwidth, GramDtype, Kernel, Weighting

#: Largest feature count for which ``gram_dtype="auto"`` builds Grams in float64: up to it the
#: n² p product costs no more than the float64 passes over the Grams every batch needs anyway.
#: Above it float32 of centred features is accurate to ~1e-8 in CKA
#: (tests/ckascope/test_stability.py).
FLOAT64_MAX_FEATURES = 128


def gram_dtype_for(x: Tensor, gram_dtype: GramDtype) -> torch.dtype:
    """The precision in which to build the Gram of features x (n, ...)."""
    if gram_dtype == "float64" or x.dtype == torch.float64:
        return torch.float64
    if gram_dtype == "float32":
        return torch.float32
    return torch.float64 if math.prod(x.shape[1:]) <= FLOAT64_MAX_FEATURES else torch.float32


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}. Hint: use one of {', '.join(choices)}")


#: The private torchmetrics hooks ``MinibatchCKA`` overrides or calls: no public API gives an
#: update method other than ``update`` the bookkeeping ``update`` gets (update count, dropping
#: the cached result), or lets ``compute`` keep a (1, 1) result (torchmetrics squeezes it).
#: Checked when this module loads, so a torchmetrics that renames them fails here, by name,
#: instead of deep inside a sweep (tests/ckascope/test_metric.py holds their contract).
TORCHMETRICS_HOOKS = ("_wrap_update", "_wrap_compute")


def check_torchmetrics(metric: type = Metric) -> None:
    """Raises ImportError when torchmetrics lacks a hook of ``TORCHMETRICS_HOOKS``."""
    missing = [name for name in TORCHMETRICS_HOOKS if not callable(getattr(metric, name, None))]
    if missing:
        import torchmetrics

        raise ImportError(
            f"ckascope needs torchmetrics' Metric.{' and Metric.'.join(missing)}, which "
            f"torchmetrics {torchmetrics.__version__} does not have. Hint: install a torchmetrics "
            "with them (1.x; tested with 1.9)"
        )


check_torchmetrics()


class MinibatchCKA(Metric):
    """Accumulates the (La, Lb) minibatch CKA matrix between two sets of layers.

    Args:
        num_layers_a: Number of layers La on side a.
        num_layers_b: Number of layers Lb on side b.
        kernel: "linear" or "rbf".
        sigma_frac: RBF bandwidth fraction f, σ² = f² · median of the batch's squared distances.
        bandwidth: RBF σ² from each batch ("batch") or fixed per layer from the first batch
            ("first"; under DDP rank 0's first batch is broadcast).
        weighting: How batches are averaged: "batch" (each once) or "examples" (by size).
        gram_dtype: Precision of the Gram products; "auto" uses float64 for layers with at most
            ``FLOAT64_MAX_FEATURES`` features and float32 (TF32 off) above.
        layer_names_a: Names used in warnings and errors (default "a[i]").
        layer_names_b: Names used in warnings and errors (default "b[j]").
        keep_batches: Also keep every batch's terms, for the bootstrap (``summary``).
        permutations: N within-batch shuffles of side b per batch, for the permutation null.
        seed: Seed of the shuffles (with the batch index: the same on every process).
        **kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    cross: Tensor
    self_a: Tensor
    self_b: Tensor
    num_batches: Tensor
    num_examples: Tensor
    nonfinite_a: Tensor
    nonfinite_b: Tensor
    sigma2_a: Tensor
    sigma2_b: Tensor
    null_cross: Tensor  # with permutations
    batch_index: list[Tensor]  # with keep_batches (a tensor while synced)

    def __init__(
        self,
        num_layers_a: int,
        num_layers_b: int,
        *,
        kernel: Kernel = "linear",
        sigma_frac: float = 1.0,
        bandwidth: Bandwidth = "batch",
        weighting: Weighting = "batch",
        gram_dtype: GramDtype = "auto",
        layer_names_a: Sequence[str] | None = None,
        layer_names_b: Sequence[str] | None = None,
        keep_batches: bool = False,
        permutations: int = 0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_layers_a < 1 or num_layers_b < 1:
            raise InputError(
                f"need at least one layer per side, got {num_layers_a} x {num_layers_b}"
            )
        check_kernel(kernel, sigma_frac)
        _check_choice(bandwidth, get_args(Bandwidth), "bandwidth")
        _check_choice(weighting, get_args(Weighting), "weighting")
        _check_choice(gram_dtype, get_args(GramDtype), "gram_dtype")
        self.num_layers_a, self.num_layers_b = num_layers_a, num_layers_b
        self.kernel, self.sigma_frac, self.bandwidth = kernel, sigma_frac, bandwidth
        self.weighting, self.gram_dtype = weighting, gram_dtype
        self.layer_names_a = _names(layer_names_a, num_layers_a, "a")
        self.layer_names_b = _names(layer_names_b, num_layers_b, "b")
        f64 = torch.float64
        self.add_state("cross", torch.zeros(num_layers_a, num_layers_b, dtype=f64), "sum")
        self.add_state("self_a", torch.zeros(num_layers_a, dtype=f64), "sum")
        self.add_state("self_b", torch.zeros(num_layers_b, dtype=f64), "sum")
        self.add_state("num_batches", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("num_examples", torch.zeros((), dtype=torch.int64), "sum")
        # Batches with NaN/Inf activations per layer: counted on the device and checked in
        # compute(), so that a batch costs no host-device synchronisation.
        self.add_state("nonfinite_a", torch.zeros(num_layers_a, dtype=f64), "sum")
        self.add_state("nonfinite_b", torch.zeros(num_layers_b, dtype=f64), "sum")
        self.keep_batches, self.permutations, self.seed = keep_batches, permutations, seed
        if permutations < 0:
            raise InputError(f"permutations must be >= 0, got {permutations}")
        self._add_calibration_states()
        self._sigma_fixed = False  # bandwidth="first": set by the first batch
        self._added = 0  # batches added by this process
        self._workspace: dict[str, Tensor] = {}  # per side, see _work
        self.register_buffer("sigma2_a", torch.full((num_layers_a,), float("nan"), dtype=f64))
        self.register_buffer("sigma2_b", torch.full((num_layers_b,), float("nan"), dtype=f64))
        self._wrap_gram_updates()

    def _add_calibration_states(self) -> None:
        if self.keep_batches:  # one entry per batch, concatenated across processes
            for name in ("batch_cross", "batch_self_a", "batch_self_b", "batch_index"):
                self.add_state(name, [], "cat")
        if self.permutations:
            shape = (self.permutations, self.num_layers_a, self.num_layers_b)
            self.add_state("null_cross", torch.zeros(shape, dtype=torch.float64), "sum")

    def _wrap_gram_updates(self) -> None:
        # torchmetrics wraps only ``update``; the Gram entry points need the same bookkeeping
        # (update count, invalidating the cached ``compute`` result). The wrappers close over
        # this object, so copies and pickles drop them and wrap their own (__setstate__).
        self.update_grams = self._wrap_update(self.update_grams)  # type: ignore[method-assign]
        self.update_packed = self._wrap_update(self.update_packed)  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("update_grams", "update_packed")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._wrap_gram_updates()

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        # torchmetrics squeezes one-element results to 0-d; a 1x1 CKA matrix must stay (1, 1).
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(wrapped)
        def shaped(*args: Any, **kwargs: Any) -> Any:
            return wrapped(*args, **kwargs).reshape(self.num_layers_a, self.num_layers_b)

        return shaped

    def update(
        self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], batch: int | None = None
    ) -> None:
        """Adds one batch given as features.

        Args:
            feats_a: La tensors (n, ...), one per layer of side a, over the same n examples.
            feats_b: Lb tensors (n, ...), one per layer of side b.
            batch: The batch's index in the sweep (orders kept batches and seeds its shuffles;
                default: the number of batches this process has added).
        """
        n = _examples(self._check_features(feats_a, "a"), self._check_features(feats_b, "b"))
        layout = BlockLayout.for_size(n)
        work_a, work_b = (
            self._work("a", len(feats_a), layout),
            self._work("b", len(feats_b), layout),
        )
        for work, feats in ((work_a, feats_a), (work_b, feats_b)):
            for row, f in zip(work, feats, strict=True):
                row.copy_(packed_gram(f, gram_dtype_for(f, self.gram_dtype), layout))
        self._accumulate(work_a, work_b, layout, batch)

    def _check_features(self, feats: Sequence[Tensor], side: str) -> int:
        """The example count n of one side's features (n, ...), checked."""
        names = self.layer_names_a if side == "a" else self.layer_names_b
        if len(feats) != len(names):
            raise InputError(f"side {side} expects {len(names)} layers, got {len(feats)}")
        for name, f in zip(names, feats, strict=True):
            if f.ndim < 2:
                raise InputError(
                    f"layer {name!r} has shape {tuple(f.shape)}; features must be (n, ...)"
                )
        counts = {f.shape[0] for f in feats}
        if len(counts) != 1:
            raise InputError(f"the layers of side {side} hold different example counts {counts}")
        return counts.pop()

    def update_grams(
        self,
        grams_a: Sequence[Tensor] | Tensor,
        grams_b: Sequence[Tensor] | Tensor,
        batch: int | None = None,
    ) -> None:
        """Adds one batch given as linear Gram matrices of column-centred features.

        The RBF kernel, if chosen, is derived from these Grams through squared distances. The
        Grams are used whole (``BlockLayout`` of depth 0): packing whole matrices costs more
        than the smaller product saves (bench_engine's step 4); ``update_packed`` takes Grams
        built packed (``recorder.GramStack``, the sweep's hooks).

        Args:
            grams_a: (La, n, n) tensor or La tensors (n, n), e.g. from ``ActivationRecorder``.
            grams_b: (Lb, n, n) tensor or Lb tensors (n, n).
            batch: See ``update``.
        """
        n = _examples(self._check_grams(grams_a, "a"), self._check_grams(grams_b, "b"))
        layout = BlockLayout(n)
        stacks = []
        for side, grams in (("a", grams_a), ("b", grams_b)):
            if isinstance(grams, Tensor):  # a float64 stack on this device is only read
                stacks.append(self._as_stack(side, grams.flatten(1), layout))
                continue
            work = self._work(side, len(grams), layout)
            for row, gram in zip(work, grams, strict=True):
                row.view_as(gram).copy_(gram)  # to float64 on the way
            stacks.append(work)
        self._accumulate(stacks[0], stacks[1], layout, batch)

    def _check_grams(self, grams: Sequence[Tensor] | Tensor, side: str) -> int:
        """The example count n of one side's Grams (n, n), checked."""
        names = self.layer_names_a if side == "a" else self.layer_names_b
        shapes = {tuple(g.shape) for g in grams}
        n = next(iter(shapes))[-1] if len(shapes) == 1 else -1
        if len(grams) != len(names) or shapes != {(n, n)}:
            got = tuple(grams.shape) if isinstance(grams, Tensor) else sorted(shapes)
            raise InputError(f"side {side} expects Grams of shape ({len(names)}, n, n), got {got}")
        return n

    def update_packed(
        self, packed_a: Tensor, packed_b: Tensor, layout: BlockLayout, batch: int | None = None
    ) -> None:
        """Adds one batch given as packed Grams (``kernels.packed_gram``, ``recorder.GramStack``).

        A float64 stack on this metric's device is only read, never copied.

        Args:
            packed_a: (La, layout.size) packed linear Grams of column-centred features.
            packed_b: (Lb, layout.size) packed Grams of the same n = layout.n examples.
            layout: Their packing.
            batch: See ``update``.
        """
        check_batch_size(layout.n, debiased=True)
        stacks = []
        for side, packed, names in (
            ("a", packed_a, self.layer_names_a),
            ("b", packed_b, self.layer_names_b),
        ):
            if tuple(packed.shape) != (len(names), layout.size):
                raise InputError(
                    f"side {side} expects packed Grams of shape ({len(names)}, {layout.size}) "
                    f"for n = {layout.n}, got {tuple(packed.shape)}"
                )
            stacks.append(self._as_stack(side, packed, layout))
        self._accumulate(stacks[0], stacks[1], layout, batch)

    def _as_stack(self, side: str, packed: Tensor, layout: BlockLayout) -> Tensor:
        """(L, size) as it is if float64 on this device, else a copy in the workspace."""
        here = packed.device == self.cross.device and packed.stride(-1) == 1
        if here and packed.dtype == torch.float64:
            return packed
        return self._work(side, len(packed), layout).copy_(packed)

    def _work(self, side: str, count: int, layout: BlockLayout) -> Tensor:
        """This side's float64 workspace (count, layout.size), reused from batch to batch.

        A fresh L x size buffer per batch costs more in page faults than filling it (16 MB for
        50 layers at n = 256).
        """
        work = self._workspace.get(side)
        if work is None or work.numel() < count * layout.size or work.device != self.cross.device:
            with torch.inference_mode(False):  # usable in and out of inference mode alike
                work = torch.empty(
                    count * layout.size, dtype=torch.float64, device=self.cross.device
                )
            self._workspace[side] = work
        return work[: count * layout.size].view(count, layout.size)

    def _accumulate(
        self, pa: Tensor, pb: Tensor, layout: BlockLayout, batch: int | None = None
    ) -> None:
        """Adds one batch of packed float64 Grams (La, size) and (Lb, size); only reads them."""
        self.nonfinite_a += _nonfinite(pa, layout)
        self.nonfinite_b += _nonfinite(pb, layout)
        if self.kernel == "rbf":  # from the linear Grams to the RBF matrices, packed again
            pa = pack(self._kernel(unpack(pa, layout), "a"), layout)
            pb = pack(self._kernel(unpack(pb, layout), "b"), layout)
        cross, self_a, self_b = packed_hsic1_terms(pa, pb, layout)
        weight = float(layout.n) if self.weighting == "examples" else 1.0
        self.cross += weight * cross
        self.self_a += weight * self_a
        self.self_b += weight * self_b
        if self.keep_batches or self.permutations:
            index = self._added if batch is None else batch
            self._calibrate(pa, pb, layout, index, weight, (cross, self_a, self_b))
        self._added += 1  # a host count: reading num_batches would synchronise a GPU
        self.num_batches += 1
        self.num_examples += layout.n

    def _calibrate(
        self,
        pa: Tensor,
        pb: Tensor,
        layout: BlockLayout,
        batch: int,
        weight: float,
        terms: tuple[Tensor, ...],
    ) -> None:
        """Keeps the batch's weighted terms and adds its shuffled cross terms, as asked."""
        if self.keep_batches:
            names = ("batch_cross", "batch_self_a", "batch_self_b")
            for name, value in zip(names, terms, strict=True):
                getattr(self, name).append(weight * value[None])
            # a fill, not a copy from the host: no wait for the device
            self.batch_index.append(
                torch.full((1,), float(batch), dtype=torch.float64, device=pa.device)
            )
        if self.permutations:
            perms = batch_permutations(self.permutations, layout.n, self.seed, batch, pa.device)
            self.null_cross += weight * permuted_cross_terms(pa, pb, layout, perms)

    def _kernel(self, grams: Tensor, side: str) -> Tensor:
        sigma2 = None
        if self.kernel == "rbf" and self.bandwidth == "first":
            sigma2 = self.sigma2_a if side == "a" else self.sigma2_b
            if not self._sigma_fixed:
                first = rbf_sigma2(sq_dists_from_gram(grams), self.sigma_frac)
                sigma2.copy_(_from_rank_zero(first))
                self._sigma_fixed = side == "b"  # both sides set by the first batch
        return kernel_from_gram(grams, self.kernel, self.sigma_frac, sigma2)[0]

    def compute(self) -> Tensor:
        """The (La, Lb) float64 CKA matrix.

        Layers whose HSIC(K, K) is not positive get NaN rows/columns and a warning naming them.

        Raises:
            NumericalError: NaN/Inf activations in some batch, naming the layers.
        """
        return self._matrix()

    def summary(self) -> SweepSummary:
        """The matrix, every batch's terms and the null replicates, after one gather.

        Collective under DDP (every process must call it); the kept batches come back in batch
        order, whichever process added them.
        """
        with self.sync_context():
            matrix = self._matrix()
            batches = self._batch_terms() if self.keep_batches else None
            null = (
                cka_from_hsic(self.null_cross, self.self_a, self.self_b)
                if self.permutations
                else None
            )
        return SweepSummary(matrix, batches, null)

    def _batch_terms(self) -> BatchTerms:
        order = torch.argsort(dim_zero_cat(self.batch_index))  # (B,)
        return BatchTerms(
            *(
                dim_zero_cat(getattr(self, n))[order]
                for n in ("batch_cross", "batch_self_a", "batch_self_b")
            )
        )

    def _matrix(self) -> Tensor:
        for side, counts, names in (
            ("a", self.nonfinite_a, self.layer_names_a),
            ("b", self.nonfinite_b, self.layer_names_b),
        ):
            if bool((counts > 0).any()):  # the one synchronisation, once per sweep
                bad = [names[i] for i in torch.nonzero(counts > 0).flatten().tolist()]
                raise NumericalError(
                    f"NaN or Inf activations in layer(s) {', '.join(bad)} (side {side}). "
                    "Hint: check the model's numerics (e.g. float16 overflow) or the input images"
                )
        warn_degenerate(self.self_a, self.layer_names_a, "a")
        warn_degenerate(self.self_b, self.layer_names_b, "b")
        return cka_from_hsic(self.cross, self.self_a, self.self_b)

    def reset(self) -> None:
        """Clears the sums and, for ``bandwidth="first"``, the fixed bandwidths."""
        super().reset()  # the batch count goes on: torchmetrics' forward() resets every batch
        self._workspace.clear()
        self.sigma2_a.fill_(float("nan"))
        self.sigma2_b.fill_(float("nan"))
        self._sigma_fixed = False


def _examples(n_a: int, n_b: int) -> int:
    """The batch's example count, the same on both sides."""
    if n_a != n_b:
        raise InputError(
            f"sides a and b hold different example counts ({n_a} vs {n_b}). "
            "Hint: feed the same images to both sides"
        )
    check_batch_size(n_a, debiased=True)
    return n_a


def _nonfinite(packed: Tensor, layout: BlockLayout) -> Tensor:
    """(L,) 1.0 for each packed Gram (L, size) holding NaN/Inf, computed on the device.

    |G_ij| <= sqrt(G_ii G_jj): a non-finite entry (NaN/Inf features, float32 overflow) always
    shows on the diagonal, so checking L x n values is enough.
    """
    leaves, _ = packed_blocks(packed, layout)
    diag = leaves.diagonal(dim1=-2, dim2=-1).flatten(-2)  # (L, n)
    return (~torch.isfinite(diag).all(dim=1)).double()


def _names(names: Sequence[str] | None, count: int, side: str) -> list[str]:
    if names is None:
        return [f"{side}[{i}]" for i in range(count)]
    if len(names) != count:
        raise InputError(f"got {len(names)} layer names for {count} layers on side {side}")
    return list(names)


def _from_rank_zero(value: Tensor) -> Tensor:
    """Rank 0's value on every rank, so a fixed RBF bandwidth is the same across DDP ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.broadcast(value, src=0)
    return value
