"""Checkpoints (round trip, ckascope's loader, bad files) and pretrained initialisation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

import ckascope.models
import msun
from ckascope.errors import InputError, WeightsUnavailableError
from msun.model import MSUN

SCALES = (16, 32, 64)


class Payload:
    """A custom class: unpickling it would import and run code from this module."""


@pytest.fixture(scope="module")
def model() -> MSUN:
    torch.manual_seed(0)
    net = msun.build_msun("resnet18", scales=SCALES, num_classes=5, routing=(20, 40))
    net.forward_all(torch.randn(4, 3, 64, 64))  # non-trivial BatchNorm statistics
    return net.eval()


@pytest.fixture(scope="module")
def saved(model: MSUN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "msun.pt"
    msun.save_checkpoint(model, path, epoch=3, history=[0.5, 0.25])
    return path


def _same_outputs(a: MSUN, b: MSUN) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(a.forward_path(x, k), b.forward_path(x, k), rtol=0, atol=0)


def test_round_trip(model: MSUN, saved: Path) -> None:
    loaded = msun.load_msun(saved)
    assert isinstance(loaded, MSUN)
    assert not loaded.training
    assert loaded.config() == model.config()
    assert loaded.routing == (20, 40)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    _same_outputs(model, loaded)


def test_file_is_plain_data(saved: Path) -> None:
    raw = torch.load(saved, weights_only=True)
    assert raw["format"] == ckascope.models.CHECKPOINT_FORMAT
    assert raw["builder"] == "msun"
    assert raw["config"] == {
        "arch": "resnet18",
        "split_at": "layer2",
        "scales": [16, 32, 64],
        "num_classes": 5,
        "routing": [20, 40],
    }
    assert raw["epoch"] == 3
    assert raw["history"] == [0.5, 0.25]


def test_ckascope_loads_it_through_the_registry(model: MSUN, saved: Path) -> None:
    loaded = ckascope.models.load_checkpoint(saved)
    assert isinstance(loaded, MSUN)
    _same_outputs(model, loaded)
    with pytest.raises(InputError, match="holds a resnet18 model, not resnet34"):
        ckascope.models.load_checkpoint(saved, arch="resnet34")


def test_wrong_arch(saved: Path) -> None:
    with pytest.raises(InputError, match="holds a resnet18 model, not resnet50"):
        msun.load_msun(saved, arch="resnet50")
    assert isinstance(msun.load_msun(saved, arch="resnet18"), MSUN)


def test_state_that_does_not_fit_the_config(saved: Path, tmp_path: Path) -> None:
    raw = torch.load(saved, weights_only=True)
    raw["config"]["split_at"] = "layer3"
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(InputError, match="does not fit a resnet18 MSUN split at layer3 model"):
        msun.load_msun(tmp_path / "edited.pt")
    raw["config"]["arch"] = "resnet99"
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(InputError, match="supported: resnet18"):
        msun.load_msun(tmp_path / "edited.pt")
    raw["config"]["colour"] = "blue"
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(InputError, match=r"unknown \['colour'\]"):
        msun.load_msun(tmp_path / "edited.pt")


def test_not_an_msun_checkpoint(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(InputError, match="is not an MSUN checkpoint"):
        msun.load_msun(tmp_path / "plain.pt")


def test_corrupt_and_truncated_files(saved: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:5000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        msun.load_msun(truncated)
    with pytest.raises(InputError, match=r"garbage\.pt"):
        msun.load_msun(garbage)
    with pytest.raises(InputError, match="does not exist"):
        msun.load_msun(tmp_path / "missing.pt")


def test_pickled_code_is_refused(model: MSUN, tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "ckascope-model", "builder": "msun", "extra": Payload()}, path)
    with pytest.raises(InputError, match="refusing to load"):
        msun.load_msun(path)


def test_reserved_extra_keys(model: MSUN, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="reserved"):
        msun.save_checkpoint(model, tmp_path / "x.pt", config={})
    assert not (tmp_path / "x.pt").exists()


def _fake_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """A random resnet18 saved where torch hub keeps the DEFAULT ImageNet weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    vanilla = torchvision.models.resnet18().eval()
    weights = ckascope.models.resolve_weights("resnet18", "default")
    assert weights is not None
    dest = ckascope.models.weights_file(weights)
    dest.parent.mkdir(parents=True)
    torch.save(vanilla.state_dict(), dest)
    return vanilla


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_pretrained_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vanilla = _fake_pretrained(tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", weights="imagenet").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), vanilla(x), rtol=0, atol=0)
    state = vanilla.state_dict()
    for k, subnet in enumerate(model.subnets):
        for name, tensor in subnet.state_dict().items():
            if name == "conv1.weight" and k < 2:  # changed stems: fresh init
                assert tensor.shape != state[name].shape
            else:
                torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    by_enum = msun.build_msun("resnet18", weights="IMAGENET1K_V1")
    torch.testing.assert_close(by_enum.head.fc.weight, vanilla.fc.weight, rtol=0, atol=0)


def test_pretrained_needs_its_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pretrained(tmp_path, monkeypatch)
    with pytest.raises(InputError, match="has 1000 classes, not 5"):
        msun.build_msun("resnet18", weights="imagenet", num_classes=5)
    with pytest.raises(InputError, match="IMAGENET1K_V1"):
        msun.build_msun("resnet18", weights="IMAGENET1K_V9")


def test_offline_without_cached_weights_fails_fast(offline: Path) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        msun.build_msun("resnet18", weights="imagenet")
    assert time.monotonic() - start < 15


def test_the_old_name_still_loads_and_names_the_new_one(saved: Path) -> None:
    with pytest.warns(FutureWarning, match="msun.load_msun"):
        old = msun.load_checkpoint(saved)
    assert old.config() == msun.load_msun(saved).config()


@pytest.mark.parametrize(
    ("recorded", "side"),
    [
        ({"inputs": {"image_size": 16, "input_size": 32}, "train_config": {"image_size": 16}}, 32),
        # a bad file's input_size is passed over: the training config's image size
        ({"inputs": {"image_size": 16, "input_size": 0}, "train_config": {"image_size": 24}}, 24),
        ({"inputs": {"image_size": 16, "input_size": -3}}, 16),
        ({"inputs": {"input_size": 5000}, "train_config": {"image_size": "32"}}, None),
        ({"inputs": {"input_size": True}, "train_config": {"image_size": 20}}, 20),
        ({}, None),
    ],
)
def test_every_reader_takes_the_side_a_checkpoint_was_fed_by_one_rule(
    tmp_path: Path, recorded: dict[str, Any], side: int | None
) -> None:
    """ckascope compare (``read_inputs``), msun train's --init-from and resume
    (``input_size``) and msun eval (``load_for_eval``) feed a checkpoint the same side: its
    ``input_size``, else its run's image size, else its ``inputs``' image size, a value that
    is no image side passed over; where none is left, ckascope its own default, msun 224."""
    from msun.checkpoint import input_size, model_payload
    from msun.evaluate import load_for_eval

    payload = model_payload(torchvision.models.resnet18(num_classes=10), "resnet18")
    torch.save({**payload, **recorded}, tmp_path / "c.pt")
    assert ckascope.models.input_side(recorded) == side
    assert ckascope.models.read_inputs(tmp_path / "c.pt").get("input_size") == side
    assert input_size(recorded) == load_for_eval(tmp_path / "c.pt").input_size == (side or 224)
