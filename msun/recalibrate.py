"""BatchNorm recalibration at the test size: FixRes's cheapest fix, for any trained network.

A network trained at one input size and tested at another sees activations whose statistics
differ from the running averages its BatchNorm layers keep (Touvron et al., "Fixing the
train-test resolution discrepancy", NeurIPS 2019, section 3). Re-estimating those statistics
on a few training images brought to the test size — no weight changes — recovers part of the
loss. ``msun eval --recalibrate-bn N`` does it before scoring each test size (and path), then
puts the original statistics back.

The estimate is the image-weighted average over the N images' batches (as
``torch.optim.swa_utils.update_bn`` averages batches, weighted so that a short last batch counts
for its images only), not a running blend with the old values. ``update_bn`` itself is not
used: it puts the whole model in training mode (dropout on), weighs every batch alike and knows
only torch's BatchNorm classes, not ``msun.privatebn.PrivateBatchNorm2d``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ckascope.platform import InputError
from msun.privatebn import PrivateBatchNorm2d

Norm = nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm | PrivateBatchNorm2d
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, PrivateBatchNorm2d)
_STATE = ("running_mean", "running_var", "num_batches_tracked")


def norm_layers(model: nn.Module) -> list[Norm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]


@contextlib.contextmanager
def kept_statistics(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm's statistics, momentum and mode are exactly as before after the block.

    Copied back into the same tensors (``copy_``), so anything holding them stays valid.
    """
    layers = norm_layers(model)
    saved = [
        ({name: getattr(m, name).clone() for name in _STATE}, m.momentum, m.training)
        for m in layers
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (tensors, momentum, training) in zip(layers, saved, strict=True):
                for name, tensor in tensors.items():
                    getattr(m, name).copy_(tensor)
                m.momentum = momentum
                m.train(training)


def recalibrate(
    model: nn.Module, batches: Iterable[Tensor], forward: Callable[[Tensor], object]
) -> int:
    """Re-estimates every BatchNorm's statistics from ``forward`` over ``batches``.

    Only the BatchNorm layers are switched to training mode (dropout and the rest keep their
    mode). The statistics are reset, then each batch of n images enters with momentum
    n / (images so far + n): the result is the image-weighted average of the batches' means
    and (unbiased) variances, whatever the batch sizes. Wrap the call in
    :func:`kept_statistics` to get the old statistics and momenta back.

    Args:
        model: The network whose BatchNorm layers ``forward`` reaches.
        batches: Input batches (n, 3, H, W) with n >= 2, already brought to the test size.
        forward: Runs the network (or one path of it) on a batch.

    Returns:
        The number of images seen (0: nothing was estimated, the layers keep reset values).

    Raises:
        InputError: A batch of fewer than 2 images (BatchNorm cannot estimate a variance).
    """
    layers = norm_layers(model)
    seen = 0
    for m in layers:
        m.reset_running_stats()
        m.train()
    with torch.no_grad():
        for x in batches:
            if len(x) < 2:
                raise InputError(
                    f"a recalibration batch of {len(x)} image; BatchNorm needs at least 2 to "
                    "estimate a variance. Hint: recalibrate on at least 2 images per batch"
                )
            for m in layers:
                m.momentum = len(x) / (seen + len(x))
            forward(x)
            seen += len(x)
    for m in layers:
        m.eval()
    return seen
