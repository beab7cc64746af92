"""Two gloo processes, each with half of the batches, give the single-process CKA matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckascope import MinibatchCKA
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
