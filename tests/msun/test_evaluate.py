"""msun.evaluate (msun eval): checkpoints of other data or sizes refused, the numbers against a
direct computation, and scoring in channels-last."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from msun import build_msun, save_checkpoint
from msun.cli import main


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_refuses_checkpoints_of_other_data_or_sizes_unless_told_which(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(model, tmp_path / "a.pt", train_config={"data": "shapes", "image_size": 32})
    save_checkpoint(model, tmp_path / "b.pt", train_config={"data": "shapes", "image_size": 48})
    args = ["eval", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--num-val", "8"]
    args += ["--eval-sizes", "16,32", "--out", str(tmp_path / "eval")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert "different image sizes (32, 48)" in refused.output
    assert "--image-size" in refused.output
    assert not (tmp_path / "eval").exists()
    told = CliRunner().invoke(main, [*args, "--image-size", "32", "--batch-size", "4"])
    assert told.exit_code == 0, told.output


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_numbers_match_a_direct_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    msun_model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(msun_model, tmp_path / "msun.pt")
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(tmp_path / "msun.pt"),
            "--eval-sizes",
            "16,24,32",
            "--image-size",
            "32",
            "--num-val",
            "12",
            "--batch-size",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())[0]
    from ckascope.data import build_dataset, eval_transform, subset_indices

    data = build_dataset("shapes", "val", eval_transform(32, 37), num_images=12, synthetic_size=32)
    idx = subset_indices(len(data), None, 0)
    images = torch.stack([data[i][0] for i in idx])
    labels = torch.tensor([data[i][1] for i in idx])
    with torch.no_grad():
        for i, size in enumerate([16, 24, 32]):
            x = (
                torch.nn.functional.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False
                )
                if size != 32
                else images
            )
            for k in range(2):
                pred = msun_model.forward_path(x, k).argmax(1)
                assert summary["top1_per_path"][i][k] == pytest.approx(
                    100 * float((pred == labels).float().mean())
                )
            assert summary["path"][i] == (0 if size <= 16 else 1)
    assert summary["mean_top1"] == pytest.approx(np.mean(summary["top1"]))
    assert summary["memory_format"] == "channels_last"  # auto on a CPU; the reference: contiguous
    assert {p.name for p in out.iterdir()} == {
        "eval.csv",
        "eval.json",
        "figure4.png",
        "figure4.pdf",
    }


def test_evaluation_in_channels_last_scores_alike_and_gives_the_model_back() -> None:
    from msun.evaluate import evaluate

    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).train()
    before = [(n, t.data_ptr(), t.stride(), t.clone()) for n, t in model.state_dict().items()]
    batches = [(torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))) for _ in range(2)]
    run = {"sizes": [12, 32], "image_size": 32}
    plain = evaluate(model, batches, memory_format="contiguous", **run)
    fast = evaluate(model, batches, memory_format="channels_last", **run)
    np.testing.assert_allclose(fast.top1, plain.top1)
    np.testing.assert_allclose(fast.top5, plain.top5)
    assert (plain.info, fast.info) == (
        {"memory_format": "contiguous"},
        {"memory_format": "channels_last"},
    )
    after = model.state_dict()
    for name, ptr, stride, value in before:
        assert (after[name].data_ptr(), after[name].stride()) == (ptr, stride), name
        assert torch.equal(after[name], value), name
    assert model.training
