"""msun.objective: each method's loss terms, the loss falls on a fixed batch, and torch.compile
changes none of it."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from msun.config import TrainConfig
from msun.objective import Objective
from msun.train import build_network


def _config(method: str, *, bn: str = "shared", distill: bool = False) -> TrainConfig:
    """A tiny resnet18 config: scales 16 and 32, 4 classes, the SI term on every pair."""
    return TrainConfig(
        model="resnet18",
        method=method,
        scales=(16, 32),
        image_size=32,
        num_classes=4,
        si_threshold=0.0,
        bn=bn,
        distill=distill,
    )


@pytest.mark.parametrize("method", ["msun", "mst", "vanilla"])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_loss_decreases_on_a_fixed_batch(method: str) -> None:
    cfg = _config(method)
    model = build_network(cfg)
    objective = Objective(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    losses = []
    for _ in range(12):
        loss, terms = objective(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(terms) == (
        {"ce_16", "ce_32", "si"}
        if method == "msun"
        else {"ce_16", "ce_32"}
        if method == "mst"
        else {"ce"}
    )


@pytest.mark.parametrize(
    ("method", "bn", "distill"),
    [("vanilla", "shared", False), ("mst", "private", True), ("msun", "private", False)],
)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_compiled_objective_computes_the_eager_loss_gradients_and_statistics(
    method: str, bn: str, distill: bool
) -> None:
    # `msun train --compile` wraps the Objective in torch.compile. The aot_eager backend runs
    # the graphs dynamo and AOT autograd capture (the private BatchNorm's set switches and
    # in-place counter updates included) without inductor's C++ build, minutes on 2 cores.
    cfg = _config(method, bn=bn, distill=distill)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    eager, compiled = build_network(cfg), build_network(cfg)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # proves the graphs ran, not eager code
    runs = [Objective(eager, cfg), torch.compile(Objective(compiled, cfg), backend=counter)]
    losses = []
    for objective in runs:
        for _ in range(2):  # the second step blends its statistics into the first one's
            loss, _ = objective(images, labels)
            loss.backward()
        losses.append(loss.detach())
    assert counter.frame_count >= 1
    assert counter.op_count > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
