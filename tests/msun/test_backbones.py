"""msun.backbones: the stem rule and the stems it gives the published MSUNs, the split points,
the supported families and the new stems' initialisation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import msun
from msun.backbones import stem_reductions, supported_archs
from msun.model import MSUN


def _conv(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    assert isinstance(module, nn.Conv2d)
    return tuple(module.kernel_size), tuple(module.stride), tuple(module.padding)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("arch", "conv", "pool"),
    [("resnet50", "conv1", "maxpool"), ("densenet121", "features.conv0", "features.pool0")],
)
def test_resnet_and_densenet_stems(
    published: dict[str, MSUN], arch: str, conv: str, pool: str
) -> None:
    s1, s2, s3 = published[arch].subnets
    assert _conv(s1.get_submodule(conv)) == ((3, 3), (1, 1), (2, 2))
    assert isinstance(s1.get_submodule(pool), nn.Identity)
    assert _conv(s2.get_submodule(conv)) == ((5, 5), (1, 1), (2, 2))
    assert isinstance(s2.get_submodule(pool), nn.MaxPool2d)
    assert _conv(s3.get_submodule(conv)) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(s3.get_submodule(pool), nn.MaxPool2d)
    for subnet in (s1, s2, s3):  # stems keep channels, BN and activation
        assert subnet.get_submodule(conv).out_channels == 64


def _pool_strides(subnet: nn.Module) -> dict[int, int]:
    features = subnet.get_submodule("features")
    return {i: m.stride for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)}


def test_vgg16_bn_pools(published: dict[str, MSUN]) -> None:
    s1, s2, s3 = published["vgg16_bn"].subnets
    assert _pool_strides(s1) == {6: 1, 13: 1, 23: 1}
    assert _pool_strides(s2) == {6: 2, 13: 2, 23: 1}
    assert _pool_strides(s3) == {6: 2, 13: 2, 23: 2}
    assert all(m.kernel_size == 2 for m in s1.modules() if isinstance(m, nn.MaxPool2d))


def _dw_stride(subnet: nn.Module, block: int) -> tuple[int, ...]:
    convs = list(subnet.get_submodule(f"features.{block}").modules())
    depthwise = [m for m in convs if isinstance(m, nn.Conv2d) and m.groups > 1]
    return tuple(depthwise[0].stride)


def test_mobilenet_v2_stems(published: dict[str, MSUN]) -> None:
    s1, s2, s3 = published["mobilenet_v2"].subnets
    assert _conv(s1.get_submodule("features.0.0")) == ((1, 1), (1, 1), (0, 0))
    assert _conv(s2.get_submodule("features.0.0")) == ((3, 3), (1, 1), (1, 1))
    assert _conv(s3.get_submodule("features.0.0")) == ((3, 3), (2, 2), (1, 1))
    assert [_dw_stride(s1, b) for b in (2, 4, 7)] == [(1, 1), (1, 1), (2, 2)]
    assert [_dw_stride(s2, b) for b in (2, 4, 7)] == [(2, 2), (2, 2), (2, 2)]
    assert s1.get_submodule("features.0.0").out_channels == 32
    assert isinstance(s1.get_submodule("features.0.2"), nn.ReLU6)


@pytest.mark.parametrize(
    ("downsamplings", "removed"), [(2, [2, 1, 0]), (3, [3, 1, 0]), (4, [3, 1, 0])]
)
def test_stem_rule_reproduces_the_published_table(downsamplings: int, removed: list[int]) -> None:
    # D = 2: ResNet/DenseNet stems; D = 3: VGG-16-BN up to features.24; D = 4: MobileNetV2 to 10.
    assert stem_reductions((32, 128, 224), downsamplings) == removed


def test_stem_rule_for_other_subnet_counts() -> None:
    assert stem_reductions((32, 224), 2) == [2, 0]
    assert stem_reductions((112, 224), 2) == [1, 0]
    # log2(4 * s / 224) = -0.81, 0.19, 1.19, 1.51 -> strides 1, 1, 2, 4, 4
    assert stem_reductions((32, 64, 128, 160, 224), 2) == [2, 2, 1, 0, 0]


def test_split_points_in_forward_order() -> None:
    assert msun.split_points("resnet50") == ["layer1", "layer2", "layer3", "layer4"]
    assert msun.split_points("densenet121") == [f"denseblock{i}" for i in range(1, 5)]
    assert msun.split_points("vgg16_bn") == [
        "features.7",
        "features.14",
        "features.24",
        "features.34",
    ]
    assert msun.split_points("vgg16") == ["features.5", "features.10", "features.17", "features.24"]
    assert msun.split_points("mobilenet_v2") == [f"features.{i}" for i in range(1, 19)]


def test_supported_archs_cover_the_families() -> None:
    archs = supported_archs()
    assert len(archs) == 23
    assert {"resnext101_64x4d", "wide_resnet101_2", "densenet201", "vgg19_bn"} <= set(archs)
    assert set(archs) <= set(torchvision.models.list_models())


def test_new_stems_keep_the_default_conv_initialisation() -> None:
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", num_classes=5)
    stem = model.subnets[0].get_submodule("conv1")
    assert stem.kernel_size == (3, 3)
    # nn.Conv2d's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / (3 * 3 * 3) ** 0.5
    assert stem.weight.abs().max() <= bound
    assert stem.weight.abs().max() > 0.9 * bound
