"""Host-device synchronisations on the per-batch paths, counted (CUDA's sync debug mode needs a
GPU): every ``.item()``, ``.tolist()``, ``bool()``, ``float()`` or ``int()`` of a tensor made by
ckascope's or msun's own compute code is counted, and the count must not grow with the batches beyond
what a check needs (one per optimiser step in training, none per batch in a CKA sweep)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckascope import models
from ckascope.compare import compare_scales
from msun.cli import main as msun_main
from tests import tinyrun

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "ckascope"), str(ROOT / "msun"))
# The data side works on CPU tensors in the loader by construction (drawing, sampling, plans).
DATA_SIDE = ("shapes.py", "data.py", "idxdata.py")
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextmanager
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []

    def wrap(name: str, original: Callable[..., object]) -> Callable[..., object]:
        def read(self: torch.Tensor, *args: object) -> object:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS) and not caller.endswith(DATA_SIDE):
                calls.append(f"{name} in {caller}")
            return original(self, *args)

        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
        yield calls


def test_a_cka_sweep_reads_nothing_back_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = models.build_model("resnet18", "none", num_classes=10)
    kwargs = {"layers": ["layer1", "layer2"], "image_size": 32, "batch_size": 8}
    counts = []
    for images in (8, 32):  # 1 and 4 batches
        with counted(monkeypatch) as calls:
            compare_scales(model, None, (16, 32), num_images=images, **kwargs)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_training_reads_back_once_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = []
    for steps in (1, 3):
        args = ["train", *tinyrun.TRAIN, "--num-train", "32", "--steps-per-epoch", str(steps)]
        with counted(monkeypatch) as calls:
            result = CliRunner().invoke(msun_main, [*args, "--out", str(tmp_path / str(steps))])
        assert result.exit_code == 0, result.output
        counts.append(len(calls))
    assert counts[1] - counts[0] == 2, counts  # the step's NaN/stop check, nothing else
