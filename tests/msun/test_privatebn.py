"""Private BatchNorm: the layer against nn.BatchNorm2d, routing, training, checkpoints, resume."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import msun.train
from ckascope.errors import InputError
from ckascope.models import model_from_checkpoint, read_checkpoint
from ckascope.views import down_and_up
from msun import build_msun
from msun.checkpoint import model_payload
from msun.cli import main
from msun.config import TrainConfig, differences
from msun.evaluate import flops_per_size
from msun.flops import count_parameters
from msun.objective import Objective, ensemble_distillation
from msun.privatebn import (
    PrivateBatchNorm2d,
    ScaleBNNet,
    build_scale_bn_net,
    privatize,
    use_bn_set,
)
from msun.train import build_network
from tests import tinyrun

STATS = ("running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("momentum", [0.1, None])
def test_each_set_is_exactly_an_independent_batchnorm(momentum: float | None) -> None:
    torch.manual_seed(0)
    refs = [nn.BatchNorm2d(6, momentum=momentum) for _ in range(3)]
    for ref in refs:  # distinct affine parameters per set
        nn.init.normal_(ref.weight)
        nn.init.normal_(ref.bias)
    layer = PrivateBatchNorm2d(6, 3, momentum=momentum)
    with torch.no_grad():
        layer.weight.copy_(torch.stack([r.weight for r in refs]))
        layer.bias.copy_(torch.stack([r.bias for r in refs]))
    for step in range(4):
        for k in (2, 0, 1) if step % 2 else (0, 1):  # set 2 sees fewer batches
            x = torch.randn(5, 6, 4, 4) * (k + 1) + k
            layer.active = k
            torch.testing.assert_close(layer(x), refs[k](x), rtol=0, atol=0)
    for k, ref in enumerate(refs):
        for name in STATS:
            assert torch.equal(getattr(layer, name)[k], getattr(ref, name)), (k, name)
    layer.eval()
    x = torch.randn(2, 6, 3, 3)
    for k, ref in enumerate(refs):
        layer.active = k
        assert torch.equal(layer(x), ref.eval()(x))


def test_gradients_reach_only_the_active_set() -> None:
    layer = PrivateBatchNorm2d(4, 3)
    layer.active = 1
    layer(torch.randn(6, 4, 2, 2)).square().sum().backward()
    assert layer.weight.grad is not None
    assert layer.weight.grad[1].abs().sum() > 0
    assert not layer.weight.grad[[0, 2]].any()


def test_privatize_copies_each_layer_into_every_set_and_keeps_names() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    nn.init.normal_(net[1].weight)
    net[1].running_mean.normal_()
    before = copy.deepcopy(net)
    assert privatize(net, 3) == 2
    assert [n for n, _ in net.named_modules()] == [n for n, _ in before.named_modules()]
    layer = net[1]
    assert isinstance(layer, PrivateBatchNorm2d)
    for name in ("weight", "bias", "running_mean", "running_var"):
        for k in range(3):
            assert torch.equal(getattr(layer, name)[k], getattr(before[1], name))
    x = torch.randn(2, 3, 8, 8)
    with use_bn_set(net, 0):
        assert torch.equal(net.eval()(x), before.eval()(x))  # every set starts as the layer


def test_use_bn_set_restores_the_previous_set_after_an_error() -> None:
    net = nn.Sequential(PrivateBatchNorm2d(2, 3), PrivateBatchNorm2d(2, 3))
    seen: list[list[int]] = []

    def fail() -> None:
        with use_bn_set(net, 0):
            seen.append([m.active for m in net])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert seen == [[0, 0]]
    assert [m.active for m in net] == [2, 2]
    with pytest.raises(InputError, match="set 3 does not exist"), use_bn_set(net, 3):
        pass


# ----------------------------------------------------------------------------- routing


def _smallest_scale_at_least(size: int, scales: tuple[int, ...]) -> int:
    return next((k for k, s in enumerate(scales) if size <= s), len(scales) - 1)


@contextlib.contextmanager
def _sets_used(model: nn.Module) -> Iterator[list[int]]:
    """The set every private BatchNorm forward of ``model`` used, in call order."""
    used: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda m, _: used.append(m.active))
        for m in model.modules()
        if isinstance(m, PrivateBatchNorm2d)
    ]
    try:
        yield used
    finally:
        for h in handles:
            h.remove()


def _private_models() -> list[tuple[str, nn.Module]]:
    torch.manual_seed(0)
    scales = (8, 16, 32)
    return [
        ("mst", build_scale_bn_net("resnet18", scales=scales, num_classes=4, image_size=32)),
        ("msun", build_msun("resnet18", scales=scales, num_classes=4, bn="private")),
    ]


@pytest.mark.parametrize("kind", ["mst", "msun"])
def test_routing_picks_the_set_of_the_smallest_scale_at_least_the_size(kind: str) -> None:
    model = dict(_private_models())[kind].eval()
    for size in range(1, 41, 3):
        x = torch.rand(1, 3, size, size)
        with _sets_used(model) as used, torch.no_grad():
            out = model(x)
        want = _smallest_scale_at_least(size, (8, 16, 32))
        assert used, size
        assert set(used) == {want}, (size, used)
        assert torch.equal(out, model.forward_path(x, want))


def test_each_scale_updates_only_its_own_set_in_a_training_step() -> None:
    """MST with private BatchNorm: set k's stem statistics are those of scale k's images."""
    cfg = TrainConfig(
        model="resnet18",
        method="mst",
        bn="private",
        scales=(8, 16, 32),
        image_size=32,
        num_classes=4,
    )
    model = build_network(cfg)
    assert isinstance(model, ScaleBNNet)
    bn1 = model.net.bn1
    assert isinstance(bn1, PrivateBatchNorm2d)
    torch.manual_seed(1)
    images = torch.rand(6, 3, 32, 32)
    Objective(model, cfg)(images, torch.arange(6) % 4)
    assert bn1.num_batches_tracked.tolist() == [1, 1, 1]
    for k, scale in enumerate(cfg.scales):  # independent: conv1 on scale k's input, momentum 0.1
        z = F.conv2d(down_and_up(images, scale, 32), model.net.conv1.weight, stride=2, padding=3)
        mean = z.detach().double().mean(dim=(0, 2, 3))
        var = z.detach().double().var(dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(bn1.running_mean[k].double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            bn1.running_var[k].double(), 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6
        )


def test_msun_paths_update_only_their_own_trunk_set() -> None:
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(8, 16, 32), num_classes=4, bn="private")
    first = model.trunk.layer2[0].bn1
    assert isinstance(first, PrivateBatchNorm2d)
    before = {n: getattr(first, n).clone() for n in STATS}
    model.forward_path(torch.rand(4, 3, 32, 32), 1)
    changed = [
        k for k in range(3) if not torch.equal(first.running_mean[k], before["running_mean"][k])
    ]
    assert changed == [1]
    assert first.num_batches_tracked.tolist() == [0, 1, 0]


def test_the_shared_default_holds_no_private_layer() -> None:
    torch.manual_seed(0)
    shared = build_msun("resnet18", scales=(8, 16, 32), num_classes=4)
    assert shared.bn == "shared"
    assert not any(isinstance(m, PrivateBatchNorm2d) for m in shared.modules())


# ----------------------------------------------------------------------------- distillation


def test_ensemble_distillation_matches_a_float64_reference() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(5, 7, requires_grad=True) for _ in range(3)]
    got = ensemble_distillation(logits)
    z = np.stack([lg.detach().double().numpy() for lg in logits])  # (S, B, C)
    mean = z.mean(0)
    p = np.exp(mean - mean.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for s in range(3):
        log_q = z[s] - z[s].max(1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
        want = float((p * (np.log(p) - log_q)).sum() / 5)  # KL(p || q_s), mean over images
        assert abs(float(got[s].detach()) - want) < 1e-6
    sum(got).backward()
    assert all(lg.grad is not None and lg.grad.abs().sum() > 0 for lg in logits)


def test_distillation_adds_one_term_per_scale() -> None:
    cfg = TrainConfig(
        model="resnet18",
        method="mst",
        bn="private",
        distill=True,
        scales=(16, 32),
        image_size=32,
        num_classes=4,
    )
    loss, terms = Objective(build_network(cfg), cfg)(torch.rand(4, 3, 32, 32), torch.arange(4))
    assert set(terms) == {"ce_16", "ce_32", "kd_16", "kd_32"}
    torch.testing.assert_close(loss.detach(), torch.stack(list(terms.values())).sum())


# ----------------------------------------------------------------------------- files and runs


@pytest.mark.parametrize("kind", ["mst", "msun"])
def test_checkpoint_round_trip_is_bit_identical(kind: str, tmp_path: Path) -> None:
    model = dict(_private_models())[kind]
    model(torch.rand(4, 3, 16, 16))  # statistics that differ between sets
    path = tmp_path / "m.pt"
    torch.save(model_payload(model, "resnet18"), path)
    loaded = model_from_checkpoint(read_checkpoint(path), path)
    assert type(loaded) is type(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def test_private_sets_add_exactly_two_vectors_per_extra_set() -> None:
    torch.manual_seed(0)
    shared = build_msun("resnet18", scales=(8, 16, 32), num_classes=4)
    private = build_msun("resnet18", scales=(8, 16, 32), num_classes=4, bn="private")
    channels = sum(m.num_features for m in shared.trunk.modules() if isinstance(m, nn.BatchNorm2d))
    extra = count_parameters(private).trunk - count_parameters(shared).trunk
    assert extra == 2 * (3 - 1) * channels


def _tiny(out: Path, *extra: str) -> list[str]:
    return ["train", *tinyrun.MODEL, "--num-train", "16", "--lr", "0.05", "--out", str(out), *extra]


def _stop_after(calls: int) -> Callable[[], contextlib.AbstractContextManager[Callable[[], bool]]]:
    """An interrupt flag raised at the ``calls``-th check: Ctrl-C at a known step."""

    @contextlib.contextmanager
    def flag() -> Iterator[Callable[[], bool]]:
        count = [0]

        def stop() -> bool:
            count[0] += 1
            return count[0] >= calls

        yield stop

    return flag


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
@pytest.mark.parametrize(
    "options",
    [["--method", "mst", "--bn", "private", "--distill"], ["--method", "msun", "--bn", "private"]],
)
def test_interrupt_then_resume_equals_an_uninterrupted_run(
    options: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = [*options, "--epochs", "2", "--deterministic"]  # 2 steps per epoch
    runner = CliRunner()
    full = runner.invoke(main, _tiny(tmp_path / "full", *common))
    assert full.exit_code == 0, full.output
    monkeypatch.setattr(
        msun.train, "interrupt_flag", _stop_after(5)
    )  # 2 steps, epoch 1's one validation batch, the end of epoch 1, step 3
    cut = runner.invoke(main, _tiny(tmp_path / "cut", *common))
    assert cut.exit_code == 130, cut.output
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["progress"]["global_step"] == 3
    monkeypatch.undo()
    resumed = runner.invoke(main, _tiny(tmp_path / "cut", *common, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["state_dict"]
    assert any(k.endswith("running_mean") and v.ndim == 2 for k, v in a.items())  # private sets
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--method", "vanilla", "--bn", "private"], "--method vanilla trains at one"),
        (["--method", "msun", "--distill"], "--distill is ensemble distillation"),
        (["--method", "mst", "--bn", "batch"], "'batch' is not one of"),
        (["--method", "mst", "--bn", "private", "--model", "vgg11"], "no BatchNorm layers"),
        (["--method", "msun", "--bn", "private", "--model", "vgg11"], "no BatchNorm layers"),
    ],
)
def test_bad_combinations_are_one_line_refusals(
    options: list[str], needle: str, tmp_path: Path
) -> None:
    result = CliRunner().invoke(main, _tiny(tmp_path / "r", "--epochs", "1", *options))
    assert result.exit_code != 0
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r" / "last.pt").exists()


def test_runs_saved_before_the_bn_options_resume_as_shared_without_distillation() -> None:
    cfg = TrainConfig(model="resnet18", method="mst", scales=(16, 32)).to_dict()
    old = {k: v for k, v in cfg.items() if k not in ("bn", "distill")}
    assert differences(old, cfg) == []
    assert differences(old, {**cfg, "bn": "private"}) == ["bn: 'shared' -> 'private'"]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_fine_tuning_keeps_the_checkpoints_private_batchnorm(tmp_path: Path) -> None:
    runner = CliRunner()
    source = tmp_path / "mst"
    done = runner.invoke(main, _tiny(source, "--method", "mst", "--bn", "private", "--epochs", "1"))
    assert done.exit_code == 0, done.output
    tuned_out = tmp_path / "tuned"
    tune = [*_tiny(tuned_out, "--epochs", "1"), "--init-from", str(source / "last.pt")]
    for extra, needle in (
        (["--bn", "shared"], "a resnet18 mst network with private BatchNorm; --bn shared asks"),
        (["--distill"], "--init-from fine-tunes the checkpoint's network as it is; --distill"),
    ):
        refused = runner.invoke(main, [*tune, *extra])
        assert refused.exit_code == 2
        assert needle in refused.output
        assert not tuned_out.exists()
    tuned = runner.invoke(main, [*tune, "--image-size", "16"])
    assert tuned.exit_code == 0, tuned.output
    # it resizes every input to its own 32 px, which its first line says
    assert "fine-tuning of" in tuned.output
    assert "at 32 px (16-px images resized)" in " ".join(tuned.output.split())
    saved = torch.load(tuned_out / "last.pt", weights_only=True)
    assert saved["builder"] == "msun-scale-bn"
    assert (saved["train_config"]["method"], saved["train_config"]["bn"]) == ("mst", "private")
    # its config.yaml records the checkpoint's BatchNorm: resumed or repeated, it is no request
    done = runner.invoke(main, ["train", "--out", str(tuned_out), "--resume"])
    assert done.exit_code == 0, done.output
    assert "is finished" in done.output
    again = ["train", "--config", str(tuned_out / "config.yaml"), "--out", str(tmp_path / "again")]
    repeated = runner.invoke(main, again)
    assert repeated.exit_code == 0, repeated.output


def test_its_flops_are_counted_at_the_side_it_resizes_every_input_to() -> None:
    """A fine-tuning run's image size (16 here) need not be the network's (32): the count is
    what its forward spends on a test image, whatever the run fed it."""
    net = build_scale_bn_net("resnet18", scales=(8, 32), num_classes=10, image_size=32).eval()
    counted = flops_per_size(net, [8, 20], "upsample", "resnet18", 16)
    for size, flops in zip([8, 20], counted, strict=True):
        with torch.no_grad(), FlopCounterMode(display=False) as spent:
            net(torch.zeros(1, 3, size, size))
        assert flops == spent.get_total_flops()
