"""The scale-invariance term of the MSUN objective.

L = sum_k CE(logits_k, y) + weight * sum_{(i, j)} [MSE(z_i, z_j) >= threshold] * MSE(z_i, z_j),

where z_k is path k's subnet output after the resize to the unified size (not normalised, not
pooled). The published setting is weight 1 over all pairs with threshold 0.01 for the ResNet
family and 0.001 for the other backbones; the authors' later revision used weight 0.1 against the largest
path only (``pairs="largest"``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn import functional as F

from ckascope.platform import InputError
from msun.recipes import recipe_for

PAIRS = ("all", "largest")


def default_si_threshold(arch: str) -> float:
    """The authors' dead-zone threshold tau: 0.01 for the ResNet family, 0.001 for the others.

    The architecture's recipe holds it (``msun.recipes``, where its source is cited).

    Raises:
        InputError: ``arch`` is not supported.
    """
    return recipe_for(arch).si_threshold


def path_pairs(num_paths: int, pairs: str) -> list[tuple[int, int]]:
    """The (i, j) index pairs of the loss: all i < j, or (i, largest) for every smaller i."""
    if pairs == "all":
        return list(itertools.combinations(range(num_paths), 2))
    if pairs == "largest":
        return [(i, num_paths - 1) for i in range(num_paths - 1)]
    raise InputError(f"unknown pairs {pairs!r}. Hint: choose one of {', '.join(PAIRS)}")


def scale_invariance_loss(
    zs: Sequence[torch.Tensor],
    *,
    weight: float = 1.0,
    threshold: float = 0.0,
    pairs: Literal["all", "largest"] = "all",
) -> torch.Tensor:
    """Sum over path pairs of MSE(z_i, z_j), each dropped when below ``threshold``, times weight.

    Gradients flow into both members of every pair (no stop-gradient). The dead zone is applied
    with ``torch.where``, so there is no host-device synchronisation.

    Args:
        zs: Unified subnet outputs in path order (ascending nominal size), each (B, C, u, u)
            (any shape, all equal); e.g. the first output of ``MSUN.forward_all``.
        weight: lambda, the factor of the whole term.
        threshold: tau; a pair whose MSE (mean over all elements) is below it contributes 0.
        pairs: "all" (every i < j) or "largest" (each smaller path against the largest).

    Returns:
        A scalar tensor.

    Raises:
        InputError: Fewer than two tensors, different shapes, a negative threshold or unknown
            ``pairs``.
    """
    if len(zs) < 2 or any(z.shape != zs[0].shape for z in zs):
        shapes = [tuple(z.shape) for z in zs]
        raise InputError(
            f"scale_invariance_loss needs at least two tensors of one shape, got {shapes}"
        )
    if threshold < 0:
        raise InputError(f"threshold must be >= 0, got {threshold}")
    total = zs[0].new_zeros(())
    for i, j in path_pairs(len(zs), pairs):
        mse = F.mse_loss(zs[i], zs[j])
        total = total + torch.where(mse >= threshold, mse, torch.zeros_like(mse))
    return weight * total
