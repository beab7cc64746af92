from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
import torchvision

from ckascope import models
from ckascope.errors import InputError, WeightsUnavailableError


def test_list_models_and_unknown_name_hint() -> None:
    assert {"resnet50", "densenet121", "vgg16_bn", "mobilenet_v2"} <= set(models.list_models())
    with pytest.raises(InputError, match="did you mean 'resnet50'"):
        models.check_arch("resnet5O")


def test_resolve_weights() -> None:
    enum = torchvision.models.ResNet50_Weights
    assert models.resolve_weights("resnet50", "none") is None
    assert models.resolve_weights("resnet50", None) is None
    assert models.resolve_weights("resnet50", "default") is enum.DEFAULT
    assert models.resolve_weights("resnet50", "IMAGENET1K_V1") is enum.IMAGENET1K_V1
    assert (
        models.resolve_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V2") is enum.IMAGENET1K_V2
    )
    with pytest.raises(InputError, match="IMAGENET1K_V1"):
        models.resolve_weights("resnet50", "IMAGENET1K_V3")


def test_random_init_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = models.build_model("resnet18", "none", num_classes=7, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = models.build_model("resnet18", "none", num_classes=7, seed=1)
    c = models.build_model("resnet18", "none", num_classes=7, seed=2)
    assert not a.training
    assert a.fc.out_features == 7
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_offline_without_cached_weights_fails_fast(offline: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        models.build_model("resnet18", "default")
    assert time.perf_counter() - start < models.DOWNLOAD_TIMEOUT + 20
    assert not any(offline.rglob("*.pth"))


def test_cached_weights_are_loaded(offline: Path) -> None:
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    source = torchvision.models.resnet18()
    path = models.weights_file(enum)
    assert str(path).startswith(str(offline))
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    model = models.build_model("resnet18", "default")
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    with pytest.raises(InputError, match="1000 classes"):
        models.build_model("resnet18", "default", num_classes=10)


def test_plain_state_dict_checkpoint(tmp_path: Path) -> None:
    source = models.build_model("resnet18", "none", num_classes=5, seed=3)
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    loaded = models.load_checkpoint(path, arch="resnet18")
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    assert torch.equal(
        models.load_checkpoint(tmp_path / "wrapped.pt", "resnet18").fc.bias, source.fc.bias
    )
    with pytest.raises(InputError, match="--model NAME"):
        models.load_checkpoint(path)
    with pytest.raises(InputError, match="does not fit a resnet34"):
        models.load_checkpoint(path, arch="resnet34")


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_hostile_and_broken_checkpoints(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, evil)
    with pytest.raises(InputError, match="refusing to load"):
        models.load_checkpoint(evil, "resnet18")
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(InputError, match="truncated or corrupted"):
        models.load_checkpoint(truncated, "resnet18")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2, 3]) + b"garbage")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        models.load_checkpoint(junk, "resnet18")
    text = tmp_path / "text.pt"
    text.write_bytes(b"hello, this is not a checkpoint")
    with pytest.raises(InputError, match="not a readable checkpoint") as refused:
        models.load_checkpoint(text, "resnet18")
    # what the file is not, and the fix; not torch.load's internal error (KeyError(104))
    assert str(refused.value).endswith(
        "not a file torch.save wrote, or one truncated or corrupted. Hint: give a checkpoint "
        "file written by torch.save"
    )
    with pytest.raises(InputError, match="does not exist"):
        models.load_checkpoint(tmp_path / "missing.pt", "resnet18")


def test_self_describing_torchvision_checkpoint(tmp_path: Path) -> None:
    source = models.build_model("resnet18", "none", num_classes=4, seed=5)
    path = tmp_path / "tv.pt"
    payload = {"arch": "resnet18", "num_classes": 4}
    torch.save(
        {
            "format": models.CHECKPOINT_FORMAT,
            "builder": "torchvision",
            "config": payload,
            "state_dict": source.state_dict(),
        },
        path,
    )
    loaded = models.load_checkpoint(path)
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    with pytest.raises(InputError, match="not resnet34"):
        models.load_checkpoint(path, arch="resnet34")


def test_self_describing_checkpoint_with_unknown_builder_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save(
        {
            "format": models.CHECKPOINT_FORMAT,
            "builder": "os:system",
            "config": {},
            "state_dict": {},
        },
        path,
    )
    with pytest.raises(InputError, match="unknown model builder"):
        models.load_checkpoint(path)


def test_the_input_size_pretrained_weights_expect() -> None:
    assert models.weights_input_size("inception_v3", "default") == 299
    assert models.weights_input_size("resnet50", "IMAGENET1K_V2") == 224
    assert models.weights_input_size("resnet50", "none") is None
    assert models.weights_input_size(None, "default") is None


def test_compare_defaults_to_the_size_the_weights_expect() -> None:
    from ckascope.commands import resolve_config
    from ckascope.config import CompareConfig

    args = vars(resolve_config(CompareConfig(model="inception_v3", weights="default")))
    assert (args["image_size"], args["scales"]) == (299, (43, 299))


class _Toy(torch.nn.Module):
    """A third model family, unknown to ckascope's code."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)).flatten(1)

    def describe(self) -> str:
        return f"toy of width {self.conv.out_channels}"


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_third_family_plugs_in_without_editing_ckascope(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckascope import plugins
    from ckascope.commands import split_vocabulary
    from ckascope.split import SplitCandidate

    def register(group: plugins.Group, target: object) -> None:  # undone after the test
        monkeypatch.setitem(plugins._REGISTERED[group], "toyfamily", target)

    register("model_builders", lambda config: _Toy(int(config["width"])))
    register(
        "split_vocabularies", lambda arch, scales: {"toynet": [SplitCandidate("conv")]}.get(arch)
    )
    source = _Toy(4)
    path = tmp_path / "toy.pt"
    payload = {"format": models.CHECKPOINT_FORMAT, "builder": "toyfamily", "config": {"width": 4}}
    torch.save({**payload, "state_dict": source.state_dict()}, path)
    loaded = models.load_checkpoint(path)
    assert torch.equal(loaded.conv.weight, source.conv.weight)
    torch.save({**payload, "config": {"width": 5}, "state_dict": source.state_dict()}, path)
    with pytest.raises(InputError, match="does not fit a toy of width 5 model"):
        models.load_checkpoint(path)
    assert "toyfamily" in plugins.list_entries("model_builders")
    assert [c.name for c in split_vocabulary("toynet")] == ["conv"]
    assert [c.name for c in split_vocabulary("resnet18")][:2] == ["layer1", "layer2"]  # msun's
    with pytest.raises(InputError, match="no registered model family knows"):
        split_vocabulary("not_a_net")


def test_ckascope_names_no_model_family_but_torchvision() -> None:
    # The arrow runs from the families to ckascope: not an import, not a string.
    root = Path(__file__).resolve().parents[2] / "ckascope"
    offenders = [p.name for p in root.glob("*.py") if "msun" in p.read_text().lower()]
    assert offenders == []


def test_plugin_entries_that_cannot_load_say_so_and_builtins_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ckascope import plugins

    monkeypatch.setitem(plugins._REGISTERED["model_builders"], "gone", "ckascope.models:nothing")
    with pytest.raises(InputError, match="cannot be loaded"):
        plugins.load("model_builders", "gone")
    monkeypatch.setitem(plugins._REGISTERED["model_builders"], "torchvision", "os:system")
    assert plugins.load("model_builders", "torchvision") is models.model_from_config
    with pytest.raises(InputError, match="nothing named 'nope'"):
        plugins.load("split_vocabularies", "nope")


def test_registering_a_taken_name_is_refused_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckascope import plugins

    monkeypatch.setattr(plugins, "_REGISTERED", {"model_builders": {}, "split_vocabularies": {}})
    plugins.register("model_builders", "mine", "pkg.a:build")
    plugins.register("model_builders", "mine", "pkg.a:build")  # the same target: no change
    with pytest.raises(InputError, match=r"already has an entry 'mine'.*replace=True"):
        plugins.register("model_builders", "mine", "pkg.b:build")
    assert plugins._REGISTERED["model_builders"]["mine"] == "pkg.a:build"
    plugins.register("model_builders", "mine", "pkg.b:build", replace=True)
    assert plugins._REGISTERED["model_builders"]["mine"] == "pkg.b:build"
    with pytest.raises(InputError, match="ckascope's own"):
        plugins.register("model_builders", "torchvision", "pkg.b:build", replace=True)
    installed = plugins._installed("model_builders")["msun"]  # this checkout's own entry point
    plugins.register("model_builders", "msun", installed)  # msun registering itself: fine
    with pytest.raises(InputError, match="already has an entry 'msun'"):
        plugins.register("model_builders", "msun", "other.pkg:build")


def test_a_checkpoint_says_what_it_was_trained_on_and_malformed_entries_are_left_out(
    tmp_path: Path,
) -> None:
    head = {"format": models.CHECKPOINT_FORMAT, "builder": "torchvision", "config": {}}
    inputs = {"image_size": 32, "scales": [8, 16, 32], "data": "fashionmnist"}
    torch.save({**head, "state_dict": {}, "inputs": inputs}, tmp_path / "run.pt")
    read = {**inputs, "input_size": 32}  # fed at its image size (models.input_side)
    assert models.read_inputs(tmp_path / "run.pt") == read
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format cannot be memory-mapped
    torch.save({**head, "inputs": inputs}, legacy, _use_new_zipfile_serialization=False)
    assert models.read_inputs(legacy) == read
    malformed = {"image_size": "32", "scales": [8], "data": ""}
    torch.save({**head, "inputs": malformed}, tmp_path / "odd.pt")
    assert models.read_inputs(tmp_path / "odd.pt") == {}
    odd = {"image_size": 3, "scales": [8, 0], "data": 3}  # below --image-size's minimum 4
    torch.save({**head, "inputs": odd}, tmp_path / "odd2.pt")
    assert models.read_inputs(tmp_path / "odd2.pt") == {}
    torch.save({**head, "inputs": {"image_size": True, "scales": [True, 8]}}, tmp_path / "b.pt")
    assert models.read_inputs(tmp_path / "b.pt") == {}  # bools are not sizes
    torch.save({"state_dict": {}, "inputs": inputs}, tmp_path / "plain.pt")  # not self-describing
    assert models.read_inputs(tmp_path / "plain.pt") == {}
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert models.read_inputs(tmp_path / "junk.pt") == {}
    assert models.read_inputs(tmp_path / "missing.pt") == {}
    tuned = {"image_size": 16, "input_size": 32, "data": "shapes"}  # fed at 32, crops of 16
    torch.save({**head, "inputs": tuned}, tmp_path / "tuned.pt")
    assert models.read_inputs(tmp_path / "tuned.pt") == tuned
    torch.save({**head, "inputs": {**tuned, "input_size": 2}}, tmp_path / "tuned2.pt")
    assert models.read_inputs(tmp_path / "tuned2.pt") == {**tuned, "input_size": 16}


def test_compare_feeds_a_checkpoint_the_side_it_was_fed_in_training(tmp_path: Path) -> None:
    """A plain network fine-tuned on 16-px crops, each resized to the 32 px it was first
    trained at, is compared at 32 px; one without ``input_size`` at its image size, as ever."""
    from ckascope.commands import resolve_config
    from ckascope.config import CompareConfig

    head = {"format": models.CHECKPOINT_FORMAT, "builder": "torchvision", "config": {}}
    for name, inputs, side in (
        ("tuned", {"image_size": 16, "input_size": 32}, 32),
        ("plain", {"image_size": 16}, 16),
    ):
        torch.save({**head, "state_dict": {}, "inputs": inputs}, tmp_path / f"{name}.pt")
        cfg = resolve_config(CompareConfig(checkpoint=tmp_path / f"{name}.pt", data="shapes"))
        assert cfg.image_size == side, name
