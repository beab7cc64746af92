from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores shared by two xdist workers: more intra-op threads than cores makes OpenMP spin and
# small ops run 30x slower, so each worker gets one thread (two in a plain single-process run).
torch.set_num_threads(
    int(
        os.environ.get(
            "CKASCOPE_TEST_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
        )
    )
)


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


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch cache and no network: proxies point at a closed local port, so a download
    fails at once here and on an online machine alike. Returns the cache folder."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return home
