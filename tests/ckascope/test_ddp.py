"""Two gloo processes, each with half of the batches, give the single-process CKA matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckascope import MinibatchCKA
from ckascope.calibration import SweepSummary
from tests.ckascope.test_metric import _batches

SIZES = [12, 10, 12, 9, 11]


KERNELS = [("linear", "batch"), ("rbf", "first")]


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Every multi-process fact in one process group (each spawn costs seconds)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plain = {kernel: _plain(kernel, bandwidth, rank, world) for kernel, bandwidth in KERNELS}
        summary = _calibrated_summary(rank, world)
        if rank == 0:
            assert summary.batches is not None
            assert summary.null is not None
            np.savez(
                out,
                **{f"plain_{k}": v for k, v in plain.items()},
                matrix=summary.matrix.numpy(),
                cross=summary.batches.cross.numpy(),
                self_a=summary.batches.self_a.numpy(),
                null=summary.null.numpy(),
            )
    finally:
        dist.destroy_process_group()


def _plain(kernel: str, bandwidth: str, rank: int, world: int) -> np.ndarray:
    """This process's share of the batches (all of them for world 1), the combined matrix."""
    a, b = _batches(SIZES)
    metric = MinibatchCKA(3, 2, kernel=kernel, bandwidth=bandwidth)  # type: ignore[arg-type]
    for fa, fb in list(zip(a, b, strict=True))[rank::world]:
        metric.update(fa, fb)
    return metric.compute().numpy()


def _calibrated_summary(rank: int, world: int) -> SweepSummary:
    a, b = _batches(SIZES)
    metric = MinibatchCKA(3, 2, keep_batches=True, permutations=5, seed=3)
    for i, (fa, fb) in list(enumerate(zip(a, b, strict=True)))[rank::world]:
        metric.update(fa, fb, batch=i)
    return metric.summary()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    """Plain CKA (linear and RBF), every batch kept in order, and the same permutation null."""
    out = tmp_path / "two.npz"
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, start_method="spawn"
    )
    got = np.load(out)
    for kernel, bandwidth in KERNELS:
        single = _plain(kernel, bandwidth, 0, 1)
        np.testing.assert_allclose(got[f"plain_{kernel}"], single, rtol=0, atol=1e-13)
    single_summary = _calibrated_summary(0, 1)
    assert single_summary.batches is not None
    assert single_summary.null is not None
    np.testing.assert_allclose(got["matrix"], single_summary.matrix.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(got["cross"], single_summary.batches.cross.numpy())  # order
    np.testing.assert_array_equal(got["self_a"], single_summary.batches.self_a.numpy())
    np.testing.assert_allclose(got["null"], single_summary.null.numpy(), rtol=0, atol=1e-13)
