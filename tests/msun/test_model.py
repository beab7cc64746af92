"""msun.model: the published MSUNs' structure (parameter counts, default split points, unified
sizes, naming), how the subnets start, and the shapes, routing and forward passes over every
architecture and split point."""

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
from tests.msun.builds import PUBLISHED, meta_msun

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


# ----------------------------------------------------------------------------- structure


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
        p.numel() for p in meta_msun("resnet50").parameters()
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


def test_vgg_default_split_is_after_the_third_pool() -> None:
    assert meta_msun("vgg16").split_at == "features.17"
    assert meta_msun("vgg11").split_at == "features.11"


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
    model = meta_msun("resnet18")
    params = [{id(p) for p in s.parameters()} for s in model.subnets]
    assert not params[0] & params[1]
    assert not params[1] & params[2]
    assert not {id(p) for p in model.trunk.parameters()} & params[2]


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_two_and_five_subnets(arch: str) -> None:
    two = meta_msun(arch, scales=(32, 224))
    five = meta_msun(arch, scales=(32, 64, 96, 160, 224))
    assert len(two.subnets) == 2
    assert len(five.subnets) == 5
    assert five.routing == (32, 64, 96, 160)
    assert two.unified_size == five.unified_size


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
