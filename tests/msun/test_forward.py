"""Shapes, routing and forward consistency over every architecture and split point."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs

import msun
from ckascope.errors import InputError
from msun.backbones import supported_archs
from msun.model import MSUN

SCALES = (16, 32, 64)
CASES = [(arch, split) for arch in supported_archs() for split in msun.split_points(arch)]


def _stride_before(arch: str, split_at: str) -> int:
    """Total stride of the vanilla network just before ``split_at``, from its published design."""
    if arch.startswith(("resnet", "resnext", "wide")):
        return {"layer1": 4, "layer2": 4, "layer3": 8, "layer4": 16}[split_at]
    if arch.startswith("densenet"):
        return 2 ** (int(split_at[-1]) + 1)  # stem /4, then each transition /2
    index = int(split_at.rpartition(".")[2])
    if arch == "mobilenet_v2":
        return 2 ** sum(index > i for i in (0, 2, 4, 7, 14))  # the stride-2 modules
    return 2 ** sum(index > i for i in _vgg_pools(arch))


def _vgg_pools(arch: str) -> list[int]:
    """Indices of the max-pools in ``features``, from torchvision's layer configuration."""
    cfg = cfgs[{"11": "A", "13": "B", "16": "D", "19": "E"}[arch[3:5]]]
    width = 3 if arch.endswith("_bn") else 2  # conv (+ BN) + ReLU per channel entry
    pools, index = [], 0
    for entry in cfg:
        if entry == "M":
            pools.append(index)
        index += 1 if entry == "M" else width
    return pools


def _ran(model: MSUN, run: Callable[[], object]) -> list[int]:
    """Indices of the subnets that ran during ``run()``."""
    ran: list[int] = []
    handles = [
        s.register_forward_hook(lambda *_, k=k: ran.append(k)) for k, s in enumerate(model.subnets)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return ran


@pytest.mark.parametrize(("arch", "split_at"), CASES)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_shapes_every_arch_and_split(arch: str, split_at: str) -> None:
    # Shapes only, on the meta device: every torchvision module supports it, so every family
    # and split point is covered at no compute cost.
    with torch.device("meta"):
        model = msun.build_msun(arch, split_at=split_at, scales=SCALES, num_classes=5).eval()
    u = SCALES[-1] // _stride_before(arch, split_at)
    assert model.unified_size == u
    channels = set()
    for k, s in enumerate(SCALES):
        raw = model.subnets[k](torch.empty(2, 3, s, s, device="meta"))
        assert raw.shape[0] == 2
        assert raw.shape[-1] == raw.shape[-2] == model.subnet_sizes[k]
        assert model.unify(raw).shape == (2, raw.shape[1], u, u)
        channels.add(raw.shape[1])
    assert len(channels) == 1
    assert model(torch.empty(2, 3, 40, 40, device="meta")).shape == (2, 5)


def test_forward_runs_the_routed_subnet_only() -> None:
    with torch.device("meta"):
        model = msun.build_msun("resnet18", scales=SCALES, num_classes=5).eval()
    for size, k in ((10, 0), (16, 0), (17, 1), (32, 1), (33, 2), (64, 2), (90, 2)):
        x = torch.empty(2, 3, size, size, device="meta")
        assert model.route(size) == k
        assert _ran(model, lambda x=x: model(x)) == [k]
        assert _ran(model, lambda x=x: model.forward_path(x, 0)) == [0]
    x = torch.empty(2, 3, 64, 64, device="meta")
    assert _ran(model, lambda: model.forward_all(x)) == [0, 1, 2]


SMALL = [
    *[("resnet18", s) for s in msun.split_points("resnet18")],
    *[("densenet121", s) for s in msun.split_points("densenet121")],
    ("vgg11", "features.3"),
    ("vgg11", "features.11"),
    *[("mobilenet_v2", s) for s in msun.split_points("mobilenet_v2")],
]
_VANILLA: dict[str, nn.Module] = {}


def _vanilla(arch: str) -> nn.Module:
    """The vanilla model build_msun starts from when the global seed is 0 (built once)."""
    if arch not in _VANILLA:
        torch.manual_seed(0)
        _VANILLA[arch] = torchvision.models.get_model(arch, num_classes=5).eval()
    return _VANILLA[arch]


@pytest.fixture(scope="module", autouse=True)
def _free_vanilla() -> Iterator[None]:
    yield
    _VANILLA.clear()


@pytest.mark.parametrize(("arch", "split_at"), SMALL)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_forward_values_agree(arch: str, split_at: str) -> None:
    torch.manual_seed(0)
    model = msun.build_msun(arch, split_at=split_at, scales=SCALES, num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    big = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        # The largest path is the vanilla network, including torchvision's functional tail.
        torch.testing.assert_close(model(big), _vanilla(arch)(big), rtol=0, atol=0)
        zs, logits = model.forward_all(big)
        for k in range(3):
            torch.testing.assert_close(zs[k], model.forward_subnet(big, k))
            torch.testing.assert_close(logits[k], model.forward_path(big, k))
            small = torch.randn(2, 3, SCALES[k], SCALES[k], generator=g)
            routed = model(small)
            torch.testing.assert_close(routed, model.forward_path(small, k, protocol="native"))
            torch.testing.assert_close(routed, model.forward_head(model.forward_features(small)))
        odd = torch.randn(2, 3, 24, 20, generator=g)  # max(H, W) = 24 -> path 1, resized to 32
        torch.testing.assert_close(model(odd), model.forward_path(odd, 1))


def test_native_protocol_feeds_the_input_as_is() -> None:
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", scales=SCALES, num_classes=5).eval()
    x = torch.randn(1, 3, 24, 24)
    z_native = model.subnets[1](x)
    assert z_native.shape[-1] == 12  # 5x5/1 conv keeps 24, the max-pool halves it
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_subnet(x, 1, protocol="native"),
            torch.nn.functional.interpolate(
                z_native, size=16, mode="bilinear", align_corners=False, antialias=False
            ),
        )
        assert not torch.allclose(model(x, protocol="native"), model(x))


def test_custom_routing() -> None:
    with torch.device("meta"):
        model = msun.build_msun("resnet18", routing=(48, 160))
    assert model.routing == (48, 160)
    assert [model.route(s) for s in (1, 48, 49, 160, 161, 1000)] == [0, 0, 1, 1, 2, 2]
    assert model.config()["routing"] == [48, 160]


def test_published_per_path_sizes_before_the_unified_resize() -> None:
    # Conv arithmetic by hand: out = (in + 2p - k) // s + 1.
    cases = {
        "resnet50": (34, 64, 56),  # 3x3/1 p2: 32 -> 34; 5x5/1 p2 + pool: 128 -> 64; original
        "densenet121": (17, 32, 28),  # + transition1 (avg-pool /2)
        "vgg16_bn": (29, 31, 28),  # 32 - 3 (three 2/1 pools); 128 / 4 - 1; 224 / 8
        "mobilenet_v2": (16, 16, 14),  # 32 / 2; 128 / 8; 224 / 16
    }
    for arch, sizes in cases.items():
        with torch.device("meta"):
            assert msun.build_msun(arch).subnet_sizes == sizes


def test_trunk_bn_sees_each_path_separately() -> None:
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", scales=SCALES, num_classes=5).train()
    bn = model.trunk.get_submodule("layer2.0.bn1")
    assert isinstance(bn, nn.BatchNorm2d)
    model.forward_all(torch.randn(2, 3, 64, 64))
    assert bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize(
    ("shape", "match"),
    [((2, 1, 32, 32), "3 channels"), ((2, 4, 32, 32), "3 channels"), ((3, 32, 32), "batch, 3")],
)
def test_wrong_input_shape(shape: tuple[int, ...], match: str) -> None:
    with torch.device("meta"):
        model = msun.build_msun("resnet18", scales=SCALES, num_classes=5)
    x = torch.empty(shape, device="meta")
    for run in (model, model.forward_all, lambda x: model.forward_path(x, 0)):
        with pytest.raises(InputError, match=match):
            run(x)
    with pytest.raises(InputError, match=r"choose one of \[0, 1, 2\]"):
        model.forward_path(torch.empty(1, 3, 8, 8, device="meta"), 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split_at": "layer5"}, "layer1, layer2, layer3, layer4"),
        ({"split_at": "features.10"}, "layer1, layer2"),
        ({"scales": (128, 32, 224)}, "increasing order"),
        ({"scales": (32, 32, 224)}, "distinct"),
        ({"scales": (0, 128, 224)}, "positive"),
        ({"scales": (-32, 224)}, "positive"),
        ({"scales": (224,)}, "2 to 5"),
        ({"scales": (16, 32, 64, 128, 192, 224)}, "2 to 5"),
        ({"scales": (32.0, 224)}, "integers"),
        ({"num_classes": 1}, ">= 2"),
        ({"routing": (128, 32)}, "increasing upper bounds"),
        ({"routing": (32,)}, "give 2 increasing"),
    ],
)
def test_bad_build_arguments(kwargs: dict[str, object], match: str) -> None:
    with torch.device("meta"), pytest.raises(InputError, match=match):
        msun.build_msun("resnet18", **kwargs)  # type: ignore[arg-type]


def test_scale_too_small_for_the_subnet() -> None:
    # vgg11 up to features.16 has four 2x2 pools; at 2 px all four become stride 1: 2 -> 1 -> 0.
    with torch.device("meta"), pytest.raises(InputError, match="scale 2 is too small"):
        msun.build_msun("vgg11", split_at="features.16", scales=(2, 224))


def test_unknown_arch_lists_the_supported_ones() -> None:
    for call in (lambda: msun.build_msun("resnet51"), lambda: msun.split_points("alexnet")):
        with pytest.raises(InputError, match="supported: resnet18, resnet34") as info:
            call()
    assert "did you mean" not in str(info.value)
    with pytest.raises(InputError, match="did you mean resnet50"):
        msun.split_points("resnet5")
    with pytest.raises(InputError, match=r"features\.1, features\.2"):
        msun.build_msun("mobilenet_v2", split_at="features.0")
