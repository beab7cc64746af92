"""Grams of features shifted by an earlier batch's mean: the same HSIC terms, checked per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckascope import kernels as K
from ckascope.metric import MinibatchCKA
from ckascope.packing import BlockLayout, packed_blocks, unpack
from ckascope.recorder import MAX_SHIFT_RATIO, GramStack
from tests import reference as ref


def _shifted_gram(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    a = x.reshape(len(x), -1) - shift
    return a @ a.T


@pytest.mark.parametrize(("n", "depth"), [(9, 0), (12, 2), (64, 3)])
@pytest.mark.parametrize("chunk_bytes", [4, 600, 2**20])
def test_gram_into_subtracts_the_shift_or_writes_the_means(
    monkeypatch: pytest.MonkeyPatch, n: int, depth: int, chunk_bytes: int
) -> None:
    monkeypatch.setattr(K, "CENTRE_CHUNK_BYTES", chunk_bytes)
    layout = BlockLayout(n, depth)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, 8, generator=g, dtype=torch.float64) + 4.0
    shift = torch.randn(24, generator=g, dtype=torch.float64)
    packed = torch.empty(layout.size, dtype=torch.float64)
    K.gram_into(x, packed_blocks(packed, layout), layout, shift=shift)
    want = _shifted_gram(x.numpy(), shift.numpy())
    np.testing.assert_allclose(unpack(packed, layout).numpy(), want, rtol=1e-13, atol=1e-12)
    means = torch.full((24,), float("nan"), dtype=torch.float64)
    K.gram_into(x, packed_blocks(packed, layout), layout, means=means)
    np.testing.assert_allclose(means.numpy(), x.reshape(n, -1).mean(0).numpy(), rtol=1e-14)
    np.testing.assert_allclose(unpack(packed, layout).numpy(), ref.linear_kernel(x), atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        K.gram_into(x, packed_blocks(packed, layout), layout, shift=shift, means=means)


@pytest.mark.parametrize(("n", "depth"), [(9, 0), (128, 1), (256, 2)])
def test_shift_ratio_is_the_squared_distance_of_the_mean_over_the_mean_square(
    n: int, depth: int
) -> None:
    layout = BlockLayout(n, depth)
    g = torch.Generator().manual_seed(depth)
    x = torch.randn(n, 30, generator=g, dtype=torch.float64) * 2.0 + 1.0
    shift = torch.randn(30, generator=g, dtype=torch.float64)
    packed = torch.empty(layout.size, dtype=torch.float64)
    blocks = packed_blocks(packed, layout)
    K.gram_into(x, blocks, layout, shift=shift)
    xs = x.numpy() - shift.numpy()
    want = np.sum(xs.mean(0) ** 2) / np.mean(np.sum(xs**2, axis=1))
    assert K.shift_ratio(blocks, layout) == pytest.approx(want, rel=1e-12)
    assert 0 < want < 1
    packed.zero_()  # every example equal to the shift
    assert K.shift_ratio(blocks, layout) == 0.0
    packed[0] = float("nan")
    assert np.isnan(K.shift_ratio(blocks, layout))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_shifted_grams_give_the_centred_grams_hsic_terms(kernel: str) -> None:
    g = torch.Generator().manual_seed(1)
    xa, xb = (torch.randn(4, 16, 50, generator=g, dtype=torch.float64) for _ in range(2))
    shifted = [
        torch.from_numpy(_shifted_gram(x.numpy(), np.full(50, 3.0) + i)) for i, x in enumerate(xa)
    ]
    centred = [torch.from_numpy(ref.linear_kernel(x.numpy())) for x in xb]
    m_shifted, m_centred = MinibatchCKA(1, 1, kernel=kernel), MinibatchCKA(1, 1, kernel=kernel)
    for s, c, b in zip(shifted, xa, centred, strict=True):
        m_shifted.update_grams([s], [b])
        m_centred.update_grams([torch.from_numpy(ref.linear_kernel(c.numpy()))], [b])
    torch.testing.assert_close(m_shifted.compute(), m_centred.compute(), rtol=1e-10, atol=1e-12)


def _batch(n: int, seed: int, offset: float) -> torch.Tensor:
    """ReLU features whose spread is 1e-3 of their mean: float32 keeps them only if centred."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, 10, 10, generator=g).relu() + offset) * 1e-3 + 1.0


def test_gram_stack_shifts_large_layers_by_an_earlier_mean_and_renews_it_when_far(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(K, "CENTRE_CHUNK_BYTES", 4096)  # 600 features at n = 64: 10 chunks
    n, layout = 64, BlockLayout.for_size(64)
    stack = GramStack("float32", layers=2)
    metric = MinibatchCKA(2, 2)
    # Batches 0-2 from one distribution, batch 3 moved by 20 of its spreads, batch 4 constant.
    batches = [_batch(n, s, 0.0) for s in range(3)] + [_batch(n, 3, 20.0)]
    batches.append(torch.full((n, 6, 10, 10), 2.0))
    seen_a, seen_b, shifts = [], [], []
    for x in batches:
        small = x[:, :1, :2, :2].clone()  # one chunk: centred, never shifted
        stack.start(n)
        rows = [stack(x), stack(small)]
        shifts.append(stack._shifts[0].clone())
        assert set(stack._shifts) == {0}
        rows_b = [
            K.packed_gram(small, torch.float64, layout),
            K.packed_gram(x, torch.float64, layout),
        ]
        metric.update_packed(torch.stack(rows), torch.stack(rows_b), layout)
        seen_a.append([x.double().numpy(), small.double().numpy()])
        seen_b.append([small.double().numpy(), x.double().numpy()])
        got = unpack(rows[0], layout).numpy()
        want = _shifted_gram(x.double().numpy(), shifts[-1].double().numpy())
        np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
    mean = [x.reshape(n, -1).mean(0) for x in batches]
    torch.testing.assert_close(shifts[0], mean[0])  # the first batch is centred
    for kept in shifts[1:3]:  # the same distribution: shifted by batch 0's mean
        torch.testing.assert_close(kept, shifts[0], rtol=0, atol=0)
    torch.testing.assert_close(shifts[3], mean[3])  # too far: taken again, centred
    torch.testing.assert_close(shifts[4], mean[4])  # constant: ratio 1, taken again
    assert unpack(stack.stack()[0], layout).abs().max() == 0  # a zero Gram, as centred
    expected = ref.minibatch_cka(seen_a, seen_b)
    got = metric.compute().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_shifting_by_the_previous_mean_is_far_inside_the_ratio_limit() -> None:
    # Batches of one distribution: about 2 / (n + 2), far below what the stack accepts.
    layout = BlockLayout.for_size(128)
    first = _batch(128, 0, 0.0).reshape(128, -1)
    packed = torch.empty(layout.size)
    blocks = packed_blocks(packed, layout)
    ratios = []
    for seed in range(1, 6):
        K.gram_into(_batch(128, seed, 0.0), blocks, layout, shift=first.mean(0))
        ratios.append(K.shift_ratio(blocks, layout))
    assert 0.2 * 2 / 130 < np.mean(ratios) < 5 * 2 / 130 < MAX_SHIFT_RATIO
