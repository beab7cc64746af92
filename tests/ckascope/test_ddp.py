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


def _worker(rank: int, world: int, init_file: str, out: str, kernel: str, bandwidth: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b = _batches(SIZES)
        metric = MinibatchCKA(3, 2, kernel=kernel, bandwidth=bandwidth)  # type: ignore[arg-type]
        for fa, fb in list(zip(a, b, strict=True))[rank::world]:
            metric.update(fa, fb)
        result = metric.compute()
        if rank == 0:
            np.save(out, result.numpy())
    finally:
        dist.destroy_process_group()


def _single(kernel: str, bandwidth: str) -> np.ndarray:
    a, b = _batches(SIZES)
    metric = MinibatchCKA(3, 2, kernel=kernel, bandwidth=bandwidth)  # type: ignore[arg-type]
    for fa, fb in zip(a, b, strict=True):
        metric.update(fa, fb)
    return metric.compute().numpy()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_two_process_gloo_equals_single_process(tmp_path: Path) -> None:
    for kernel, bandwidth in [("linear", "batch"), ("rbf", "first")]:
        out = tmp_path / f"{kernel}.npy"
        init = tmp_path / f"init-{kernel}"
        mp.start_processes(
            _worker,
            args=(2, str(init), str(out), kernel, bandwidth),
            nprocs=2,
            start_method="spawn",
        )
        np.testing.assert_allclose(np.load(out), _single(kernel, bandwidth), rtol=0, atol=1e-13)


def _calibrated_worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        summary = _calibrated_summary(rank, world)
        if rank == 0:
            assert summary.batches is not None
            assert summary.null is not None
            np.savez(
                out,
                matrix=summary.matrix.numpy(),
                cross=summary.batches.cross.numpy(),
                self_a=summary.batches.self_a.numpy(),
                null=summary.null.numpy(),
            )
    finally:
        dist.destroy_process_group()


def _calibrated_summary(rank: int, world: int) -> SweepSummary:
    a, b = _batches(SIZES)
    metric = MinibatchCKA(3, 2, keep_batches=True, permutations=5, seed=3)
    for i, (fa, fb) in list(enumerate(zip(a, b, strict=True)))[rank::world]:
        metric.update(fa, fb, batch=i)
    return metric.summary()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_two_processes_keep_every_batch_in_order_and_the_same_null(tmp_path: Path) -> None:
    out = tmp_path / "calibrated.npz"
    mp.start_processes(
        _calibrated_worker,
        args=(2, str(tmp_path / "init-calibrated"), str(out)),
        nprocs=2,
        start_method="spawn",
    )
    single = _calibrated_summary(0, 1)
    assert single.batches is not None
    assert single.null is not None
    got = np.load(out)
    np.testing.assert_allclose(got["matrix"], single.matrix.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(got["cross"], single.batches.cross.numpy())  # batch order
    np.testing.assert_array_equal(got["self_a"], single.batches.self_a.numpy())
    np.testing.assert_allclose(got["null"], single.null.numpy(), rtol=0, atol=1e-13)
