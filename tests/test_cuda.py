"""CUDA paths, run where a GPU is (``pytest -m cuda``); skipped elsewhere, never faked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckascope import MinibatchCKA, compare_scales
from ckascope.models import build_model
from msun.cli import main as msun_main
from tests import tinyrun

pytestmark = pytest.mark.cuda


def test_minibatch_cka_on_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    feats_a = [torch.randn(64, 300, generator=g) for _ in range(3)]
    feats_b = [torch.randn(64, 40, generator=g) for _ in range(2)]
    cpu = MinibatchCKA(3, 2)
    cpu.update(feats_a, feats_b)
    gpu = MinibatchCKA(3, 2).cuda()
    gpu.update([f.cuda() for f in feats_a], [f.cuda() for f in feats_b])
    np.testing.assert_allclose(gpu.compute().cpu().numpy(), cpu.compute().numpy(), atol=1e-6)


def test_compare_on_cuda_equals_cpu() -> None:
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 3, 64, 64), torch.zeros(16, dtype=torch.long)
    )
    kw = {"layers": "stages", "image_size": 64, "batch_size": 8}
    cpu = compare_scales(build_model("resnet18", "none", num_classes=10), data, (16, 64), **kw)
    gpu = compare_scales(
        build_model("resnet18", "none", num_classes=10), data, (16, 64), device="cuda", **kw
    )
    assert gpu.settings["device"].startswith("cuda")
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=1e-4)  # cuDNN vs oneDNN convolutions


def test_msun_train_step_on_cuda_with_bf16(tmp_path: Path) -> None:
    args = [
        "train",
        *tinyrun.TRAIN,
        "--device",
        "cuda",
        "--amp",
        "bf16",
        "--out",
        str(tmp_path / "run"),
    ]
    result = CliRunner().invoke(msun_main, args)
    assert result.exit_code == 0, result.output
    assert (
        torch.load(tmp_path / "run" / "last.pt", weights_only=True)["progress"]["global_step"] == 2
    )
