from __future__ import annotations

import pytest
import torchvision
from torch import nn

from ckascope import list_presets, resolve_layers
from ckascope.errors import InputError


def _model(name: str) -> nn.Module:
    return torchvision.models.get_model(name, weights=None)


@pytest.mark.parametrize(
    ("name", "blocks", "first", "last"),
    [
        ("resnet18", 9, "maxpool", "layer4.1"),
        ("resnet50", 17, "maxpool", "layer4.2"),
        ("resnext50_32x4d", 17, "maxpool", "layer4.2"),
        ("densenet121", 8, "features.pool0", "features.denseblock4"),
        ("mobilenet_v2", 18, "features.0", "features.17"),
        ("vgg16_bn", 13, "features.2", "features.42"),
        ("vgg11", 8, "features.1", "features.19"),
        ("efficientnet_b0", 17, "features.0", "features.7.0"),
    ],
)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_blocks_preset(name: str, blocks: int, first: str, last: str) -> None:
    layers = resolve_layers(_model(name), "blocks")
    assert len(layers) == blocks
    assert layers[0] == first
    assert layers[-1] == last


@pytest.mark.parametrize(
    ("name", "stages"),
    [
        ("resnet50", ["maxpool", "layer1", "layer2", "layer3", "layer4"]),
        ("densenet121", ["features.pool0"] + [f"features.denseblock{i}" for i in range(1, 5)]),
        ("mobilenet_v2", [f"features.{i}" for i in (0, 1, 3, 6, 13, 17)]),
        ("vgg16_bn", [f"features.{i}" for i in (6, 13, 23, 33, 43)]),
    ],
)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_stages_preset(name: str, stages: list[str]) -> None:
    assert resolve_layers(_model(name), "stages") == stages


def test_leaves_patterns_and_mixed_specs_keep_model_order() -> None:
    model = _model("resnet18")
    leaves = resolve_layers(model, "leaves")
    assert all(not list(model.get_submodule(n).children()) for n in leaves)
    assert "conv1" in leaves
    assert "layer1" not in leaves
    assert resolve_layers(model, ["layer2.*.conv1", "conv1"]) == [
        "conv1",
        "layer2.0.conv1",
        "layer2.1.conv1",
    ]
    assert resolve_layers(model, ["layer1", "blocks"])[:3] == ["maxpool", "layer1", "layer1.0"]
    assert set(list_presets()) == {"blocks", "stages", "leaves"}


def test_empty_spec_and_empty_preset() -> None:
    with pytest.raises(InputError, match="no layers given"):
        resolve_layers(_model("resnet18"), [])
    with pytest.raises(InputError, match="preset 'blocks' found no layers"):
        resolve_layers(nn.Sequential(nn.Linear(2, 2)), "blocks")
