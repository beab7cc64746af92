"""msun.train.train_or_reuse: a fresh run trains, an interrupted one resumes, a finished one is
reused untouched, and a folder with a run of other settings is refused and left as it is."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckascope.errors import InputError
from msun import train
from msun.config import TrainConfig


def _tiny(out: Path, **change: Any) -> TrainConfig:
    """A run of seconds: resnet18 MSUN on 16 synthetic 16-px images, 2 steps of 8, 1 epoch."""
    options: dict[str, Any] = {
        "model": "resnet18",
        "scales": (8, 16),
        "image_size": 16,
        "num_train": 16,
        "num_val": 8,
        "batch_size": 8,
        "epochs": 1,
        "eval_sizes": "8,16",
        "out": str(out),
        **change,
    }
    return TrainConfig(**options)


def _progress(last: Path) -> dict[str, Any]:
    progress: dict[str, Any] = torch.load(last, weights_only=True)["progress"]
    return progress


def _folder(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of ``folder`` with its modification time and content."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def mains(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The ``resume`` flag of every training ``train_or_reuse`` starts (``msun.train.main``)."""
    calls: list[bool] = []
    real = train.main

    def spy(cfg: TrainConfig, *, resume: bool = False) -> Path:
        calls.append(resume)
        return real(cfg, resume=resume)

    monkeypatch.setattr(train, "main", spy)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (shared: the tests that use it must leave it as it is)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(_tiny(out))
    return out


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_fresh_run_trains(tmp_path: Path, mains: list[bool]) -> None:
    last = train.train_or_reuse(_tiny(tmp_path / "run"))
    assert last == tmp_path / "run" / "last.pt"
    assert mains == [False]
    assert _progress(last)["epoch"] == 1


@contextlib.contextmanager
def _ctrl_c() -> Iterator[Callable[[], bool]]:
    """``interrupt_flag`` with Ctrl-C pressed from the start: the first step saves and stops."""
    yield lambda: True


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_an_interrupted_run_resumes(
    tmp_path: Path, mains: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _tiny(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(train, "interrupt_flag", _ctrl_c)
        with pytest.raises(train.TrainingInterruptedError):
            train.main(cfg)
    last = Path(cfg.out) / "last.pt"
    assert (_progress(last)["epoch"], _progress(last)["global_step"]) == (0, 1)  # 1 step of 2
    assert train.train_or_reuse(cfg) == last
    assert mains == [False, True]  # the interrupted start, then the resume
    assert _progress(last)["epoch"] == 1
    assert _progress(last)["global_step"] == 2  # one step left, not the two of a new run


def test_a_finished_run_is_reused_without_training(finished: Path, mains: list[bool]) -> None:
    before = _folder(finished)
    assert train.train_or_reuse(_tiny(finished)) == finished / "last.pt"
    assert train.train_or_reuse(_tiny(finished, eval_sizes="16", workers=1)) == finished / "last.pt"
    assert mains == []
    assert _folder(finished) == before


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"split_at": "layer3"}, "split_at: 'layer2' -> 'layer3'"),
        ({"seed": 1}, "seed: 0 -> 1"),
        ({"epochs": 2}, "epochs: 1 -> 2"),
        ({"method": "mst"}, "method: 'msun' -> 'mst'"),
    ],
)
def test_a_run_with_other_settings_is_refused_and_left_as_it_is(
    finished: Path, mains: list[bool], change: dict[str, Any], named: str
) -> None:
    before = _folder(finished)
    with pytest.raises(InputError) as refused:
        train.train_or_reuse(_tiny(finished, **change))
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert f"{finished} holds a run with other settings" in message
    assert named in message
    assert "Hint:" in message
    assert mains == []
    assert _folder(finished) == before
