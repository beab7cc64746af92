"""BatchNorm recalibration at the test size (msun eval --recalibrate-bn)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ckascope.errors import InputError
from ckascope.platform import CHECKPOINT_FORMAT, torch_save
from ckascope.views import resize
from msun import build_msun, save_checkpoint
from msun.cli import main
from msun.evaluate import Recalibration, _passes, evaluate, recalibration_set
from msun.privatebn import build_scale_bn_net
from msun.recalibrate import kept_statistics, norm_layers, recalibrate
from tests import tinyrun
from tests.idxfiles import write_idx
from tests.refusals import assert_refused


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _batches(seed: int, count: int = 3, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(6, 3, size, size, generator=g) * 2 + 0.5,
            torch.randint(0, 4, (6,), generator=g),
        )
        for _ in range(count)
    ]


def test_statistics_are_the_equal_weight_average_of_the_batches_in_float64() -> None:
    net = _small_net()
    batches = [x for x, _ in _batches(1)]
    recalibrate(net, batches, net)
    conv, bn = net[0], net[1]
    outs = [conv(x).detach().double().numpy() for x in batches]  # (n, C, h, w) each
    mean = np.mean([o.mean(axis=(0, 2, 3)) for o in outs], axis=0)
    var = np.mean(
        [o.transpose(1, 0, 2, 3).reshape(5, -1).var(axis=1, ddof=1) for o in outs], axis=0
    )
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
    assert not net.training
    assert not bn.training
    assert not net[3].training  # dropout never switched on


def test_uneven_batches_weigh_each_image_alike() -> None:
    """Batches of 6, 6 and 2 images: the mean is that of all 14 images' features; the variance
    the image-weighted mean of the batches' unbiased variances (float64 reference)."""
    net = _small_net()
    batches = [*(x for x, _ in _batches(10)[:2]), _batches(11)[0][0][:2]]
    assert [len(x) for x in batches] == [6, 6, 2]
    recalibrate(net, batches, net)
    outs = [net[0](x).detach().double().numpy() for x in batches]  # (n, C, h, w) each
    every = np.concatenate(outs)
    np.testing.assert_allclose(
        net[1].running_mean.double().numpy(), every.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6
    )
    var = [o.transpose(1, 0, 2, 3).reshape(5, -1).var(axis=1, ddof=1) for o in outs]
    want = np.average(var, axis=0, weights=[len(o) for o in outs])
    np.testing.assert_allclose(net[1].running_var.double().numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="batch of 1 image"):
        recalibrate(net, [batches[0][:1]], net)


def test_kept_statistics_restores_everything_after_success_and_after_an_error() -> None:
    net = _small_net()
    net[1].running_mean.normal_()
    before, tensors = _state(net), [net[1].running_mean, net[1].running_var]
    with kept_statistics(net):
        recalibrate(net, [x for x, _ in _batches(2)], net)
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])

    def fail() -> None:
        with kept_statistics(net):
            recalibrate(net, [x for x, _ in _batches(3)], net)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net[1].momentum == 0.1
    assert not net[1].training
    assert net[1].running_mean is tensors[0]
    assert net[1].running_var is tensors[1]


def _trained_on(
    net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], size: int
) -> None:
    """Gives ``net`` the exact average statistics of ``batches`` at ``size`` (as training would)."""
    bn = net[1]
    bn.reset_running_stats()
    bn.momentum = None
    bn.train()
    with torch.no_grad():
        for x, _ in batches:
            net(resize(x, size))
    bn.momentum = 0.1
    bn.eval()


def test_same_size_and_same_images_change_nothing() -> None:
    net, data = _small_net(), _batches(4)
    _trained_on(net, data, 16)
    before = _state(net)
    plain = evaluate(net, data, [16], image_size=16)
    again = evaluate(net, data, [16], image_size=16, recalibration=data)
    np.testing.assert_array_equal(plain.top1, again.top1)
    np.testing.assert_array_equal(plain.top5, again.top5)
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before)


def test_each_size_is_scored_with_statistics_of_its_own_size() -> None:
    """Against a reference: statistics estimated by hand at each size, then plain evaluation."""
    net, test, train = _small_net(), _batches(5, count=4), _batches(6)
    _trained_on(net, train, 16)
    before = _state(net)
    sizes = [4, 8, 16]
    got = evaluate(net, test, sizes, image_size=8, recalibration=train)
    for i, size in enumerate(sizes):
        ref = copy.deepcopy(net)
        _trained_on(ref, [(resize(resize(x, size), 8), y) for x, y in train], 8)
        want = evaluate(ref, test, [size], image_size=8)
        assert got.top1[i, 0] == want.top1[0, 0], size
        assert got.top5[i, 0] == want.top5[0, 0], size
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before)


@pytest.mark.parametrize("kind", ["msun", "mst-private"])
def test_multi_path_models_are_recalibrated_path_by_path(kind: str) -> None:
    torch.manual_seed(0)
    model = (
        build_msun("resnet18", scales=(8, 16), num_classes=4)
        if kind == "msun"
        else build_scale_bn_net("resnet18", scales=(8, 16), num_classes=4, image_size=16)
    ).eval()
    test, train = _batches(7, count=2), _batches(8, count=2)
    before = _state(model)
    got = evaluate(model, test, [8, 16], image_size=16, recalibration=train)
    for i, size in enumerate([8, 16]):
        for k in range(2):
            ref = copy.deepcopy(model)
            for m in norm_layers(ref):
                m.reset_running_stats()
                m.momentum = None
                m.train()
            with torch.no_grad():
                for x, _ in train:
                    ref.forward_path(resize(x, size), k)
            ref.eval()
            want = evaluate(ref, test, [size], image_size=16)
            assert got.top1[i, k] == want.top1[0, k], (size, k)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)


def test_an_empty_recalibration_set_is_refused() -> None:
    net = _small_net()
    with pytest.raises(Exception, match="no images to recalibrate"):
        evaluate(net, _batches(9), [16], image_size=16, recalibration=[])


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_recalibrate_bn_is_recorded_and_labelled(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train = ["train", *tinyrun.TRAIN, "--method", "mst", "--bn", "private", "--out", str(run)]
    assert CliRunner().invoke(main, train).exit_code == 0
    out = tmp_path / "ev"
    args = [
        "eval",
        str(run / "last.pt"),
        "--num-val",
        "8",
        "--recalibrate-bn",
        "12",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (summary,) = json.loads((out / "eval.json").read_text())
    assert summary["recalibrate_bn"] == 12
    assert summary["bn"] == "private"
    assert summary["variant"] == "mst, private BN, BN recalibrated on 12"
    assert summary["recalibrate_batch"] == 12  # --batch-size 64, but 12 images in all
    assert "BN recalibrated on 12" in result.output
    assert summary["path"] == [0, 1]  # 16 px -> set 0, 32 px -> set 1


def test_the_progress_bar_counts_one_pass_per_size_and_path_when_recalibrating() -> None:
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(8, 16), num_classes=4)
    loader, sizes = _batches(12, count=3), [8, 12, 16]
    recal = Recalibration(_batches(13), images=18, batch_size=6)
    assert _passes(model, sizes, "all", None, loader) == 3  # one pass, every size and path
    assert _passes(model, sizes, "all", recal, loader) == 3 * 3 * 2  # per size and path
    assert _passes(model, sizes, "routed", recal, loader) == 3 * 3  # per size
    assert _passes(_small_net(), sizes, "all", recal, loader) == 3 * 3  # one path


def _torchvision_checkpoint(path: Path, arch: str, num_classes: int = 10) -> Path:
    """A vanilla run's kind of checkpoint of a small torchvision network (random weights)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, num_classes=num_classes).eval()
    config = {"arch": arch, "num_classes": num_classes}
    payload = {"format": CHECKPOINT_FORMAT, "builder": "torchvision", "config": config}
    torch_save({**payload, "state_dict": net.state_dict()}, path)
    return path


def test_recalibrating_a_network_without_batchnorm_is_refused_up_front(tmp_path: Path) -> None:
    """squeezenet has no BatchNorm: "recalibrated" scores would be the plain ones, mislabelled."""
    plain = _torchvision_checkpoint(tmp_path / "sq.pt", "squeezenet1_1")
    with_bn = _torchvision_checkpoint(tmp_path / "mob.pt", "mobilenet_v3_small")
    tail = ["--num-val", "8", "--recalibrate-bn", "8", "--out", str(tmp_path / "ev")]
    line = assert_refused(
        main,
        ["eval", str(plain), *tail],
        "sq (squeezenet1_1) has no BatchNorm running statistics",
        tmp_path,
    )
    assert "--recalibrate-bn" in line
    line = assert_refused(  # several checkpoints: the one without BatchNorm is named
        main, ["eval", str(with_bn), str(plain), *tail], "sq (squeezenet1_1)", tmp_path
    )
    assert "mob" not in line


def test_recalibrating_on_batches_of_one_image_is_refused_before_any_checkpoint_is_read(
    tmp_path: Path,
) -> None:
    """The checkpoint does not exist: only a check made before reading it can name the flags."""
    argv = ["eval", str(tmp_path / "none.pt"), "--recalibrate-bn", "3", "--batch-size", "1"]
    line = assert_refused(main, argv, "--batch-size 2 or more with --recalibrate-bn", tmp_path)
    assert line.count("--recalibrate-bn") == 2


def _msun_checkpoint(path: Path, num_classes: int = 10, **train_config: object) -> Path:
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=num_classes).eval()
    save_checkpoint(model, path, train_config={"data": "shapes", "image_size": 32, **train_config})
    return path


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_more_images_than_the_training_set_holds_are_refused_naming_its_size(
    tmp_path: Path,
) -> None:
    """The synthetic set is as large as the run's training set (--num-train, else 20000); a
    count far beyond it once crashed in randperm. A real set refuses above its own size."""
    tail = ["--num-val", "8", "--eval-sizes", "16,32", "--out", str(tmp_path / "ev")]
    run = _msun_checkpoint(tmp_path / "run.pt", num_train=40)
    size = (
        "training images than the synthetic set drawn for this run (its --num-train, else 20000) "
        "holds: 40. Hint: give --recalibrate-bn 40 or fewer"
    )
    for count in ("41", "1000000000"):
        argv = ["eval", str(run), "--recalibrate-bn", count, *tail]
        line = assert_refused(main, argv, f"--recalibrate-bn {count} asks for more", tmp_path)
        assert size in line
    default = _msun_checkpoint(tmp_path / "default.pt")  # no --num-train: msun train's 20000
    argv = ["eval", str(default), "--recalibrate-bn", "20001", *tail]
    assert_refused(main, argv, "--recalibrate-bn 20000 or fewer", tmp_path)
    write_idx(tmp_path / "fm", 20, gz=True)
    argv = ["eval", str(run), "--data", f"fashionmnist:{tmp_path / 'fm'}", *tail]
    line = assert_refused(main, [*argv, "--recalibrate-bn", "21"], "fashionmnist", tmp_path)
    assert "holds: 20. Hint: give --recalibrate-bn 20 or fewer" in line


def test_a_recalibration_set_of_the_whole_training_set_records_the_batch_it_used(
    tmp_path: Path,
) -> None:
    write_idx(tmp_path / "fm", 20, gz=True)
    whole = recalibration_set(f"fashionmnist:{tmp_path / 'fm'}", 28, 20, 64, 0)
    assert (whole.images, whole.batch_size) == (20, 20)  # --batch-size 64 never filled
    assert [len(b.images) for b in whole.batches] == [20]
    synthetic = recalibration_set("shapes", 16, 12, 5, 0, synthetic_train=12)
    assert (synthetic.images, synthetic.batch_size) == (12, 5)


def test_recalibrating_on_a_folder_without_training_images_names_the_flag(
    tmp_path: Path,
) -> None:
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "data" / "val" / label).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "data" / "val" / label / "0.png")
    run = _msun_checkpoint(tmp_path / "run.pt", num_classes=2)
    argv = ["eval", str(run), "--data", str(tmp_path / "data"), "--recalibrate-bn", "8"]
    argv += ["--eval-sizes", "16,32", "--out", str(tmp_path / "ev")]
    line = assert_refused(main, argv, "has no train/ folder", tmp_path)
    assert "--recalibrate-bn needs the training images" in line
    assert "training needs" not in line
