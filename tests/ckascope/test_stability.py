"""Deep float32 features nearly constant across images: exact here, wrong from un-centred Grams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ckascope import MinibatchCKA
from ckascope.kernels import hsic1
from tests import reference as ref


def _mlp_features(batches: int = 3, n: int = 128) -> list[list[torch.Tensor]]:
    torch.manual_seed(0)
    linears = [nn.Linear(512, 512) for _ in range(18)]  # default (Kaiming-uniform) init
    out = []
    with torch.no_grad():
        for _ in range(batches):
            h, feats = torch.randn(n, 512), []
            for linear in linears:
                h = torch.relu(linear(h))
                feats.append(h.clone())
            out.append(feats)
    return out


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_deep_relu_mlp_float32_within_1e6_of_float64_reference() -> None:
    batches = _mlp_features()
    last = batches[0][-1]
    assert float(last.std(0).mean() / last.mean()) < 1e-4  # nearly constant deep features
    as_np = [[f.numpy() for f in fb] for fb in batches]
    expected = ref.minibatch_cka(as_np, as_np)
    for gram_dtype in ("float32", "auto"):
        metric = MinibatchCKA(18, 18, gram_dtype=gram_dtype)  # type: ignore[arg-type]
        for feats in batches:
            metric.update(feats, feats)
        got = metric.compute().numpy()
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_uncentred_float32_grams_lose_the_deep_layers() -> None:
    # The failure mode the engine avoids: un-centred float32 Grams give a non-positive
    # (or wildly wrong) HSIC(K, K) for the last layer.
    feats = _mlp_features(batches=1)[0]
    k = feats[-1] @ feats[-1].T
    naive = float(hsic1(k, k))
    exact = ref.hsic1(ref.linear_kernel(feats[-1].numpy()), ref.linear_kernel(feats[-1].numpy()))
    assert not abs(naive - exact) < 1e-3 * abs(exact)
