from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from msun.model import MSUN
from tests.msun.builds import PUBLISHED, meta_msun


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Runs msun's tests on one thread, then restores the previous setting.

    They run tiny models, where a second intra-op thread buys nothing and, when the two cores
    are shared with other test processes, OpenMP's barriers stall each op by up to 100x.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def published() -> dict[str, MSUN]:
    """The four published MSUNs on the meta device (test_backbones.py, test_model.py)."""
    return {arch: meta_msun(arch) for arch in PUBLISHED}
