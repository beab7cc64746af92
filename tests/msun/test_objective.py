"""msun.objective: each method's loss terms, and the loss falls on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from msun.config import TrainConfig
from msun.objective import Objective
from msun.train import build_network


@pytest.mark.parametrize("method", ["msun", "mst", "vanilla"])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_loss_decreases_on_a_fixed_batch(method: str) -> None:
    cfg = TrainConfig(
        model="resnet18",
        method=method,
        scales=(16, 32),
        image_size=32,
        num_classes=4,
        si_threshold=0.0,
    )
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
