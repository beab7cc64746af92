from __future__ import annotations

import os

import pytest
import torch

# Two cores: one intra-op thread per test worker keeps the suite fast and results reproducible.
torch.set_num_threads(int(os.environ.get("CKASCOPE_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
