"""Published structure, parameter counts, split points, stem rule and naming of MSUN."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import nn

import msun
from ckascope.errors import InputError
from msun.backbones import stem_reductions, supported_archs
from msun.model import MSUN

PUBLISHED = ("resnet50", "densenet121", "vgg16_bn", "mobilenet_v2")


def _meta(arch: str, **kwargs: object) -> MSUN:
    # Structure only: parameter counts and shapes do not depend on the device.
    with torch.device("meta"):
        return msun.build_msun(arch, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def published() -> Iterator[dict[str, MSUN]]:
    return {arch: _meta(arch) for arch in PUBLISHED}


def _count(module: nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


@pytest.mark.parametrize(
    ("arch", "vanilla", "total"),
    [
        ("resnet50", 25.557, 25.995),
        ("densenet121", 7.979, 8.722),
        ("vgg16_bn", 138.366, 141.842),
        ("mobilenet_v2", 3.505, 3.874),
    ],
)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_published_parameter_counts(
    published: dict[str, MSUN], arch: str, vanilla: float, total: float
) -> None:
    model = published[arch]
    assert _count(model) == total
    assert _count(msun.backbones.meta_model(arch)) == vanilla
    params = msun.count_parameters(model)
    assert round(params.total / 1e6, 3) == total
    assert round(params.vanilla / 1e6, 3) == vanilla
    assert sum(params.subnets) + params.trunk + params.head == params.total
    assert params.subnets[-1] + params.trunk + params.head == params.vanilla


def test_meta_build_counts_like_a_real_build() -> None:
    torch.manual_seed(0)
    real = msun.build_msun("resnet50")
    assert sum(p.numel() for p in real.parameters()) == sum(
        p.numel() for p in _meta("resnet50").parameters()
    )


def test_published_defaults_and_unified_sizes(published: dict[str, MSUN]) -> None:
    splits = {m.arch: (m.split_at, m.unified_size) for m in published.values()}
    assert splits == {
        "resnet50": ("layer2", 56),
        "densenet121": ("denseblock2", 28),
        "vgg16_bn": ("features.24", 28),
        "mobilenet_v2": ("features.10", 14),
    }
    for model in published.values():
        assert model.scales == (32, 128, 224)
        assert model.routing == (32, 128)


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


def test_vgg_default_split_is_after_the_third_pool() -> None:
    assert _meta("vgg16").split_at == "features.17"
    assert _meta("vgg11").split_at == "features.11"


def _names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_modules() if n}


@pytest.mark.parametrize("arch", PUBLISHED)
def test_names_map_back_to_torchvision(published: dict[str, MSUN], arch: str) -> None:
    model = published[arch]
    vanilla = msun.backbones.meta_model(arch)
    largest = {model.canonical_name(n) for n in _names(model) if model.path_of(n) in (None, 2)} - {
        ""
    }
    assert largest == _names(vanilla)
    keys = {model.canonical_name(k) for k in model.state_dict() if model.path_of(k) in (None, 2)}
    assert keys == set(vanilla.state_dict())
    assert all(model.canonical_name(n) in _names(vanilla) | {""} for n in _names(model))


def test_canonical_name_and_path_of() -> None:
    assert MSUN.canonical_name("subnets.1.layer1.0.conv1") == "layer1.0.conv1"
    assert MSUN.canonical_name("subnets.0.features.3") == "features.3"
    assert MSUN.canonical_name("trunk.layer2.0") == "layer2.0"
    assert MSUN.canonical_name("head.fc.weight") == "fc.weight"
    assert MSUN.canonical_name("subnets.2") == ""
    assert MSUN.path_of("subnets.12.conv1") == 12
    assert MSUN.path_of("trunk.features.24") is None
    assert MSUN.path_of("head") is None
    with pytest.raises(InputError, match=r"subnets\.K\."):
        MSUN.canonical_name("trunkated.layer1")


def test_subnets_are_independent_copies() -> None:
    model = _meta("resnet18")
    params = [{id(p) for p in s.parameters()} for s in model.subnets]
    assert not params[0] & params[1]
    assert not params[1] & params[2]
    assert not {id(p) for p in model.trunk.parameters()} & params[2]


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_two_and_five_subnets(arch: str) -> None:
    two = _meta(arch, scales=(32, 224))
    five = _meta(arch, scales=(32, 64, 96, 160, 224))
    assert len(two.subnets) == 2
    assert len(five.subnets) == 5
    assert five.routing == (32, 64, 96, 160)
    assert two.unified_size == five.unified_size


def test_supported_archs_cover_the_families() -> None:
    archs = supported_archs()
    assert len(archs) == 23
    assert {"resnext101_64x4d", "wide_resnet101_2", "densenet201", "vgg19_bn"} <= set(archs)
    assert set(archs) <= set(torchvision.models.list_models())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_every_subnet_starts_from_its_own_fresh_model(arch: str) -> None:
    torch.manual_seed(0)
    model = msun.build_msun(arch, num_classes=5)
    states = [s.state_dict() for s in model.subnets]
    convs = [n for n, t in states[-1].items() if t.ndim == 4]
    for small in states[:-1]:
        for name in convs:
            if small[name].shape == states[-1][name].shape:
                assert not torch.equal(small[name], states[-1][name]), name
    # Built first, the largest path (subnet, trunk, head) starts as a vanilla model of the seed.
    torch.manual_seed(0)
    vanilla = torchvision.models.get_model(arch, num_classes=5).state_dict()
    path = {
        MSUN.canonical_name(n): t
        for n, t in model.state_dict().items()
        if MSUN.path_of(n) in (None, model.num_paths - 1)
    }
    assert path.keys() == vanilla.keys()
    for name, tensor in vanilla.items():
        torch.testing.assert_close(path[name], tensor, rtol=0, atol=0)


def test_new_stems_keep_the_default_conv_initialisation() -> None:
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", num_classes=5)
    stem = model.subnets[0].get_submodule("conv1")
    assert stem.kernel_size == (3, 3)
    # nn.Conv2d's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / (3 * 3 * 3) ** 0.5
    assert stem.weight.abs().max() <= bound
    assert stem.weight.abs().max() > 0.9 * bound
