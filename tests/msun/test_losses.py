"""The scale-invariance loss: value, dead zone, pair sets, gradients."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import msun
from ckascope.errors import InputError


def _zs(rng: torch.Generator, n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(2, 4, 5, 5, generator=rng, requires_grad=True) for _ in range(n)]


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).sum().detach() / a.numel())


def test_value_is_the_sum_of_pair_mses(rng: torch.Generator) -> None:
    zs = _zs(rng)
    expected = _mse(zs[0], zs[1]) + _mse(zs[0], zs[2]) + _mse(zs[1], zs[2])
    loss = msun.scale_invariance_loss(zs)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert msun.scale_invariance_loss(zs, weight=0.1).item() == pytest.approx(0.1 * expected)


def test_largest_pairs(rng: torch.Generator) -> None:
    zs = _zs(rng, 4)
    expected = sum(_mse(zs[i], zs[3]) for i in range(3))
    loss = msun.scale_invariance_loss(zs, pairs="largest")
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dead_zone_drops_a_close_pair_exactly(rng: torch.Generator) -> None:
    base = torch.randn(2, 4, 5, 5, generator=rng)
    near = (base + 0.01 * torch.randn(2, 4, 5, 5, generator=rng)).requires_grad_()
    far = (base + torch.randn(2, 4, 5, 5, generator=rng)).requires_grad_()
    base.requires_grad_()
    close, threshold = _mse(base, near), 0.01
    assert close < threshold < _mse(base, far)
    loss = msun.scale_invariance_loss([base, near, far], threshold=threshold)
    assert loss.item() == pytest.approx(_mse(base, far) + _mse(near, far), rel=1e-6)
    loss.backward()
    assert near.grad is not None
    # near's gradient comes from the (near, far) pair only: the dead pair adds exactly 0.
    torch.testing.assert_close(near.grad, 2 * (near - far).detach() / near.numel())
    # A pair exactly at the threshold counts (>=).
    at = msun.scale_invariance_loss([base, near], threshold=close)
    assert at.item() == pytest.approx(close, rel=1e-6)
    assert msun.scale_invariance_loss([base, near], threshold=threshold).item() == 0.0


def test_gradients_reach_every_subnet_without_stop_gradient() -> None:
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", scales=(16, 32, 64), num_classes=5).train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    zs, logits = model.forward_all(x)
    # The loss alone must move both members of every pair, the largest path included.
    msun.scale_invariance_loss(zs).backward()
    for subnet in model.subnets:
        grad = subnet.get_submodule("conv1").weight.grad
        assert grad is not None
        assert grad.abs().sum() > 0
    assert all(p.grad is None for p in model.trunk.parameters())
    model.zero_grad()
    zs, logits = model.forward_all(x)
    total = sum(F.cross_entropy(out, y) for out in logits) + msun.scale_invariance_loss(zs)
    assert isinstance(total, torch.Tensor)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"pairs": "nearest"}, "all, largest"), ({"threshold": -1.0}, ">= 0")],
)
def test_bad_arguments(rng: torch.Generator, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        msun.scale_invariance_loss(_zs(rng), **kwargs)  # type: ignore[arg-type]


def test_needs_two_tensors_of_one_shape(rng: torch.Generator) -> None:
    with pytest.raises(InputError, match="at least two"):
        msun.scale_invariance_loss(_zs(rng, 1))
    with pytest.raises(InputError, match="one shape"):
        msun.scale_invariance_loss([torch.zeros(1, 2), torch.zeros(1, 3)])


def test_published_thresholds() -> None:
    assert msun.default_si_threshold("resnet50") == 0.01
    assert msun.default_si_threshold("densenet121") == 0.001
    assert msun.default_si_threshold("mobilenet_v2") == 0.001
    with pytest.raises(InputError, match="supported"):
        msun.default_si_threshold("alexnet")
