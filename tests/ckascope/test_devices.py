"""Device indices are checked before any CUDA call (the machine's GPU count is faked here)."""

from __future__ import annotations

import pytest
import torch

from ckascope import distributed
from ckascope.errors import InputError


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A machine that reports one GPU; records set_device calls instead of making them."""
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_a_gpu_index_beyond_the_count_is_one_clear_line(one_gpu: list[object]) -> None:
    with pytest.raises(InputError, match=r"GPU 7, but this process sees 1 GPU\(s\)"):
        distributed.resolve_device("cuda:7")
    assert distributed.resolve_device("cuda:0") == torch.device("cuda", 0)


def test_a_single_process_on_cuda_n_sets_its_device(one_gpu: list[object]) -> None:
    info = distributed.init_distributed("cuda:0")
    assert info.device == torch.device("cuda", 0)
    assert one_gpu == [torch.device("cuda", 0)]


def test_a_local_rank_beyond_the_gpu_count_is_refused(
    one_gpu: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InputError, match="LOCAL_RANK 1 asks for GPU 1") as refused:
        distributed.init_distributed("auto")
    assert one_gpu == []  # refused before any CUDA call
    assert not refused.value.whole_job  # rank 0 has its GPU: rank 1 says it, at once


def test_only_a_group_it_started_is_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[bool] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: ended.append(True))
    distributed.close_distributed()  # the caller's group: left alone
    assert ended == []
    monkeypatch.setattr(distributed, "_OWNED", True)
    distributed.close_distributed()
    assert ended == [True]
