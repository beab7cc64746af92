"""ckascope on MSUN models: routed paths, canonical layer alignment, --split-at auto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ckascope.cli import main as ckascope_main
from ckascope.compare import compare_scales
from ckascope.data import build_dataset, eval_transform, subset_indices
from ckascope.multipath import PathView, is_multipath
from ckascope.result import CKAResult
from msun import build_msun, save_checkpoint
from msun.cli import main as msun_main
from msun.privatebn import PrivateBatchNorm2d, build_scale_bn_net
from tests import reference as ref
from tests import tinyrun
from tests.refusals import assert_refused

#: 16 synthetic images at 16 and 32 px, two batches: a comparison of a tiny model in seconds.
SMALL_SWEEP = [
    *("--scales", "16", "32", "--image-size", "32", "--resize-size", "37"),
    *("--num-images", "16", "--batch-size", "8"),
]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_msun("resnet18", scales=(16, 32), num_classes=10).eval()


@pytest.fixture(scope="module")
def data() -> torch.utils.data.Dataset:
    shapes = build_dataset(None, "val", eval_transform(32, 37), num_images=16, synthetic_size=32)
    images, labels = zip(*(shapes[i] for i in range(len(shapes))), strict=True)
    return torch.utils.data.TensorDataset(torch.stack(images), torch.tensor(labels))


def test_path_view_uses_canonical_names(tiny: torch.nn.Module) -> None:
    assert is_multipath(tiny)
    view = PathView(tiny, 0)
    assert view.get_submodule("layer1.0") is tiny.subnets[0].layer1[0]
    assert view.get_submodule("layer2.0") is tiny.trunk.layer2[0]


def test_routed_paths_aligned_by_canonical_name_equal_a_direct_computation(
    tiny: torch.nn.Module, data
) -> None:
    result = compare_scales(
        tiny,
        data,
        (16, 32),
        layers=["layer1.1", "layer3.1"],
        image_size=32,
        batch_size=8,
        num_images=16,
    )
    assert result.layers_a == result.layers_b == ["layer1.1", "layer3.1"]
    assert result.settings["paths"] == [0, 1]
    feats: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda m, i, o: feats.__setitem__(name, o.detach().clone())

    modules = {
        "s0": tiny.subnets[0].layer1[1],
        "s1": tiny.subnets[1].layer1[1],
        "t": tiny.trunk.layer3[1],
    }
    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    idx = subset_indices(len(data), None, 0)
    batches_a, batches_b = [], []
    try:
        with torch.no_grad():
            for start in (0, 8):
                images = torch.stack([data[i][0] for i in idx[start : start + 8]])
                tiny.forward_path(
                    F.interpolate(images, size=16, mode="bilinear", align_corners=False), 0
                )
                batches_a.append([feats["s0"].double().numpy(), feats["t"].double().numpy()])
                tiny.forward_path(images, 1)
                batches_b.append([feats["s1"].double().numpy(), feats["t"].double().numpy()])
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(result.matrix, ref.minibatch_cka(batches_a, batches_b), atol=1e-6)


def test_cli_compare_on_an_msun_checkpoint_and_overlay(
    tiny: torch.nn.Module, tmp_path: Path
) -> None:
    save_checkpoint(tiny, tmp_path / "msun.pt")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--checkpoint",
        str(tmp_path / "msun.pt"),
        *SMALL_SWEEP,
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(ckascope_main, args)
    assert result.exit_code == 0, result.output
    saved = CKAResult.load(out)
    assert saved.layers_a[:2] == ["maxpool", "layer1.0"]
    assert len(saved.layers_a) == 9
    assert saved.settings["paths"] == [0, 1]
    split = CliRunner().invoke(ckascope_main, ["suggest-split", "--from", str(out)])
    assert split.exit_code == 2
    assert "chosen on a single-path network" in split.stderr


def test_suggest_split_refuses_a_multi_path_checkpoint_before_comparing(
    tiny: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckascope import commands

    def no_comparison(*args: object) -> None:
        raise AssertionError("the comparison ran before the refusal")

    monkeypatch.setattr(commands, "_analyse_and_save", no_comparison)
    save_checkpoint(tiny, tmp_path / "msun.pt")
    args = ["suggest-split", "--checkpoint", str(tmp_path / "msun.pt"), *SMALL_SWEEP]
    split = CliRunner().invoke(ckascope_main, [*args, "--out", str(tmp_path / "cmp")])
    assert split.exit_code == 2, split.output
    assert "chosen on a single-path network" in split.stderr
    assert not (tmp_path / "cmp").exists()


def test_scales_routed_to_one_path_are_compared_with_a_note(
    tiny: torch.nn.Module, tmp_path: Path
) -> None:
    save_checkpoint(tiny, tmp_path / "msun.pt")
    args = ["compare", "--checkpoint", str(tmp_path / "msun.pt"), *SMALL_SWEEP, "--no-figures"]
    args[args.index("--scales") + 1] = "24"  # 24 and 32 both go to the 32-px path
    result = CliRunner().invoke(ckascope_main, [*args, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert CKAResult.load(tmp_path / "cmp").settings["paths"] == [1, 1]
    assert "note: both scales went to path 1" in result.stderr


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_split_at_auto_from_a_saved_analysis(tmp_path: Path) -> None:
    analysis = tmp_path / "analysis"
    args = [
        "compare",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--num-classes",
        "10",
        *SMALL_SWEEP,
        "--out",
        str(analysis),
    ]
    assert CliRunner().invoke(ckascope_main, args).exit_code == 0
    run = tmp_path / "run"
    train = ["train", *tinyrun.TRAIN, "--out", str(run)]
    result = CliRunner().invoke(
        msun_main, [*train, "--split-at", "auto", "--cka-from", str(analysis)]
    )
    assert result.exit_code == 0, result.output
    suggestion = (run / "split-analysis" / "suggestion.json").read_text()
    choice = __import__("json").loads(suggestion)["choice"]
    assert torch.load(run / "last.pt", weights_only=True)["config"]["split_at"] == choice
    assert f"--split-at auto -> {choice}" in result.stdout
    again = CliRunner().invoke(
        msun_main,
        [*train, "--split-at", "auto", "--cka-from", str(analysis), "--resume", "--epochs", "1"],
    )
    assert again.exit_code == 0, again.output
    # Started again before its first checkpoint (e.g. killed in epoch 1): it replaces its own
    # split-analysis/ (the result and suggestion.json), and refuses one holding a user's file
    # before analysing anything.
    for name in ("last.pt", "best.pt"):
        (run / name).unlink()
    fresh = [*train, "--split-at", "auto", "--cka-from", str(analysis)]
    restarted = CliRunner().invoke(msun_main, fresh)
    assert restarted.exit_code == 0, restarted.output
    assert (run / "split-analysis" / "suggestion.json").read_text() == suggestion
    for name in ("last.pt", "best.pt"):
        (run / name).unlink()
    (run / "split-analysis" / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(msun_main, fresh)
    assert refused.exit_code == 2, refused.output
    assert "split-analysis holds files that are not an earlier split analysis" in refused.stderr
    assert "--split-at auto ->" not in refused.stdout  # refused before the analysis
    assert (run / "split-analysis" / "notes.txt").read_text() == "mine"


def test_split_at_auto_refuses_an_analysis_that_does_not_show_every_split_points_input(
    tmp_path: Path,
) -> None:
    analysis = tmp_path / "narrow"
    compare = ["compare", "--model", "resnet18", "--weights", "none", "--num-classes", "10"]
    compare += [*SMALL_SWEEP, "--layers", "layer3.*,layer4", "--out", str(analysis)]
    assert CliRunner().invoke(ckascope_main, compare).exit_code == 0
    train = ["train", *tinyrun.TRAIN, "--out", str(tmp_path / "run"), "--split-at", "auto"]
    done = CliRunner().invoke(msun_main, [*train, "--cka-from", str(analysis)])
    assert done.exit_code == 2, done.output
    [line] = done.stderr.strip().splitlines()
    assert f"--cka-from {analysis} does not show the trunk input of layer1, layer2, layer3" in line
    assert "name the split with --split-at" in line
    assert "suggest-split" not in line  # the trainer's words, not ckascope's


def test_split_at_auto_without_analysis_offline(tmp_path: Path, offline: Path) -> None:
    args = [
        "train",
        *tinyrun.TRAIN,
        "--split-at",
        "auto",
        "--out",
        str(tmp_path / "r"),
    ]
    line = assert_refused(msun_main, args, "analyses the pretrained resnet18", tmp_path)
    # why it needs them, and the analyses that can be made offline, for this run's range
    assert "a random network's cross-scale CKA says little" in line
    assert "ckascope compare --checkpoint RUN/last.pt --scales 16 32 --image-size 32" in line
    assert "ckascope compare --model resnet18 --weights none --scales 16 32" in line
    assert "then --cka-from DIR" in line
    wrong = CliRunner().invoke(
        msun_main, [*args[:-2], "--method", "vanilla", "--out", str(tmp_path / "v")]
    )
    assert wrong.exit_code == 2
    assert "no subnets" in wrong.stderr


def test_pretrained_weights_offline_name_msun_trains_own_options(
    tmp_path: Path, offline: Path
) -> None:
    args = ["train", *tinyrun.TRAIN, "--method", "vanilla", "--weights", "default"]
    line = assert_refused(msun_main, [*args, "--out", str(tmp_path / "r")], "not cached", tmp_path)
    assert "Hint: --weights none" in line
    assert "--init-from FILE" in line
    assert "--checkpoint" not in line  # ckascope compare's option, not msun train's


def test_pretrained_weights_offline_are_refused_before_the_split_analysis_is_written(
    tmp_path: Path, offline: Path
) -> None:
    """--split-at auto --cka-from writes split-analysis/ as it chooses; the network (and its
    weights) comes after: the weights are checked first, so the refusal leaves no file."""
    layers = ["maxpool", *(f"layer{s}.{i}" for s in range(1, 5) for i in range(2))]
    settings = {"mode": "scales", "model": "resnet18", "arch": "resnet18", "scales": [16, 32]}
    CKAResult(np.full((1, 9, 9), 0.9), layers, layers, settings).save(tmp_path / "cka")
    args = ["train", *tinyrun.TRAIN, "--weights", "default", "--split-at", "auto"]
    args += ["--cka-from", str(tmp_path / "cka"), "--out", str(tmp_path / "r")]
    line = assert_refused(msun_main, args, "not cached", tmp_path)
    assert "Hint: --weights none" in line


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_split_at_auto_under_torchrun_runs_the_analysis_on_every_rank(tmp_path: Path) -> None:
    """Without --cka-from the analysis is collective: rank 0 alone would hang (gloo, 2 ranks)."""
    import os
    import subprocess
    import sys

    import torchvision

    from ckascope import models

    weights = models.resolve_weights("resnet18", "default")
    assert weights is not None
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    dest = tmp_path / "hub" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    dest.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), dest)  # stands in for ImageNet's
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "msun", "train", *tinyrun.TRAIN, "--split-at", "auto", "--out", str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "split-analysis" / "suggestion.json").is_file()
    saved = CKAResult.load(run / "split-analysis")
    assert saved.settings["world_size"] == 2


def test_a_private_batchnorm_network_compares_each_scale_with_its_own_set(data) -> None:
    """Scale 16 runs with BatchNorm set 0 (16 px, back up to 32), scale 32 with set 1."""
    torch.manual_seed(0)
    net = build_scale_bn_net("resnet18", scales=(16, 32), num_classes=10, image_size=32)
    with torch.no_grad():  # sets that differ, so a wrong set would show
        for m in net.modules():
            if isinstance(m, PrivateBatchNorm2d):
                m.running_mean[0].normal_()
    net.eval()
    layers = ["layer1.1", "layer3.1"]
    result = compare_scales(
        net, data, (16, 32), layers=layers, image_size=32, batch_size=8, num_images=16
    )
    assert result.settings["paths"] == [0, 1]
    feats: dict[str, torch.Tensor] = {}
    hooks = [
        net.net.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: feats.__setitem__(n, o.detach().double())
        )
        for n in layers
    ]
    batches_a, batches_b = [], []
    idx = subset_indices(len(data), None, 0)
    try:
        with torch.no_grad():
            for start in (0, 8):
                images = torch.stack([data[i][0] for i in idx[start : start + 8]])
                small = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
                net.forward_path(small, 0)
                batches_a.append([feats[n].numpy() for n in layers])
                net.forward_path(images, 1)
                batches_b.append([feats[n].numpy() for n in layers])
    finally:
        for h in hooks:
            h.remove()
    np.testing.assert_allclose(result.matrix, ref.minibatch_cka(batches_a, batches_b), atol=1e-6)
