"""msun.runstate: each rank's generators on resume, a resume with other settings refused, and the
lock that keeps a second run out of a run folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from msun.runstate import RunLock
from tests.msun.runs import train_tiny


def test_each_rank_resumes_its_own_generators() -> None:
    from ckascope.distributed import DistInfo
    from msun.runstate import restore_rng

    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append({"torch": torch.get_rng_state()})
    cpu = torch.device("cpu")
    for rank in (0, 1):
        restore_rng({"ranks": states}, DistInfo(rank, 2, cpu))
        assert torch.equal(torch.get_rng_state(), states[rank]["torch"])
    restore_rng({"torch": states[1]["torch"], "cuda": []}, DistInfo(0, 1, cpu))  # older format
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_resume_with_a_different_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_tiny(out, "--epochs", "1").exit_code == 0
    result = train_tiny(out, "--epochs", "1", "--resume", "--seed", "3")
    assert result.exit_code == 2
    assert "seed: 0 -> 3" in result.stderr
    again = train_tiny(out, "--epochs", "1")
    assert again.exit_code == 2
    assert "--resume" in again.stderr


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_second_run_on_a_locked_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    with RunLock(out):
        result = train_tiny(out, "--epochs", "1")
    assert result.exit_code == 2
    assert "in use" in result.stderr
    assert train_tiny(out, "--epochs", "1").exit_code == 0  # the lock went with its holder
    assert not (out / ".lock").exists()  # a finished run leaves no lock file


def test_a_lock_file_removed_under_a_starting_process_is_not_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = RunLock(tmp_path / "run").__enter__()
    stale = os.open(first.path, os.O_RDWR)  # a second run opens the file ...
    first.__exit__(None)  # ... which its holder removes on leaving, then it locks that file
    second = RunLock(tmp_path / "run")
    opened = iter([stale])
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a: next(opened, None) or real_open(*a))
    assert second._lock() is None  # it notices the file is gone: no lock on a removed file
    fd = second._lock()  # and takes a fresh one
    assert fd is not None
    assert os.fstat(fd).st_ino == os.stat(second.path).st_ino
    os.close(fd)
