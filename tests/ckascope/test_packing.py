"""Packed symmetric matrices: the layout, its round trip, and every engine path built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckascope import kernels as K
from ckascope.errors import InputError
from ckascope.functional import packed_inner, packed_stats
from ckascope.metric import MinibatchCKA
from ckascope.packing import BlockLayout, full_blocks, pack, packed_blocks, unpack
from ckascope.recorder import GramStack
from tests import reference as ref

#: (n, depth) pairs: the whole matrix, odd sizes, and every depth the engine can choose.
LAYOUTS = [(5, 0), (6, 1), (12, 2), (64, 3), (128, 1), (256, 2), (200, 1)]


def _symmetric(count: int, n: int, seed: int) -> torch.Tensor:
    a = torch.randn(count, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a + a.mT


@pytest.mark.parametrize(
    ("n", "depth"), [(4, 0), (96, 0), (127, 0), (128, 1), (200, 1), (256, 2), (512, 3), (4096, 3)]
)
def test_the_layout_for_a_batch_size_keeps_leaves_of_at_least_64_rows(n: int, depth: int) -> None:
    layout = BlockLayout.for_size(n)
    assert layout.depth == depth
    assert layout.size * 2 ** (depth + 1) == n * n * (2**depth + 1)  # 1/2 + 1/2^(depth+1) of n²
    assert layout.diag_size == n * n // 2**depth


@pytest.mark.parametrize(("n", "depth"), [(6, 2), (0, 0), (8, -1)])
def test_impossible_layouts_are_refused(n: int, depth: int) -> None:
    with pytest.raises(ValueError, match="no block layout"):
        BlockLayout(n, depth)


@pytest.mark.parametrize(("n", "depth"), LAYOUTS)
def test_pack_then_unpack_gives_the_matrices_back(n: int, depth: int) -> None:
    layout = BlockLayout(n, depth)
    full = _symmetric(6, n, n + depth).reshape(2, 3, n, n)  # any leading dimensions
    packed = pack(full, layout)
    assert packed.shape == (2, 3, layout.size)
    torch.testing.assert_close(unpack(packed, layout), full, rtol=0, atol=0)
    # Every value is stored once: the packed values are the leaves and the upper blocks.
    leaves, uppers = packed_blocks(packed, layout)
    assert leaves.numel() + sum(u.numel() for u in uppers) == packed.numel()


def test_pack_reads_only_the_leaves_and_upper_blocks_and_converts_into_out() -> None:
    layout = BlockLayout(8, 2)
    full = _symmetric(1, 8, 0)[0]
    garbled = full.clone()
    for lower in full_blocks(garbled, layout)[2]:  # the upper blocks' mirror images
        lower.fill_(float("nan"))
    assert garbled.isnan().sum() == 8 * 8 * 3 // 8  # 3/8 of the matrix is never read
    torch.testing.assert_close(unpack(pack(garbled, layout), layout), full, rtol=0, atol=0)
    out = torch.empty(layout.size, dtype=torch.float32)
    pack(full, layout, out=out)
    torch.testing.assert_close(out, pack(full, layout).float(), rtol=0, atol=0)


@pytest.mark.parametrize(("n", "depth"), LAYOUTS)
def test_packed_inner_products_and_stats_match_numpy(n: int, depth: int) -> None:
    layout = BlockLayout(n, depth)
    ka, kb = _symmetric(3, n, 1), _symmetric(2, n, 2) + 5.0  # not centred: large row sums
    inner = packed_inner(pack(ka, layout), pack(kb, layout), layout)
    want = np.einsum("aij,bij->ab", ka.numpy(), kb.numpy())
    np.testing.assert_allclose(inner.numpy(), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    stats = packed_stats(pack(kb, layout), layout)
    tilde = kb.numpy() * (1 - np.eye(n))  # K̃: K with its diagonal zeroed
    np.testing.assert_array_equal(stats.diag.numpy(), np.diagonal(kb.numpy(), axis1=1, axis2=2))
    np.testing.assert_allclose(stats.rows.numpy(), tilde.sum(axis=2), rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(stats.sq_norm.numpy(), (tilde**2).sum(axis=(1, 2)), rtol=1e-12)


@pytest.mark.parametrize(("n", "depth"), [(9, 0), (12, 2), (64, 3)])
@pytest.mark.parametrize("chunk_bytes", [4, 600, 2**20])
def test_packed_gram_is_the_reference_gram_at_every_depth_and_chunk_width(
    monkeypatch: pytest.MonkeyPatch, n: int, depth: int, chunk_bytes: int
) -> None:
    monkeypatch.setattr(K, "CENTER_CHUNK_BYTES", chunk_bytes)
    layout = BlockLayout(n, depth)
    x = torch.randn(n, 3, 4, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    far = x * 0.01 + 50.0  # a spread far below the mean: centring keeps the digits
    want = ref.linear_kernel(far.numpy())
    got = unpack(K.packed_gram(far, torch.float64, layout), layout).numpy()
    np.testing.assert_allclose(got, want, atol=1e-14)
    x32 = (x + 1.0).float()
    want32 = ref.linear_kernel(x32.double().numpy())
    got32 = unpack(K.packed_gram(x32, torch.float32, layout), layout).double().numpy()
    np.testing.assert_allclose(got32, want32, atol=1e-6 * np.abs(want32).max())
    # A caller's centring buffer changes nothing.
    blocks_out = torch.empty(layout.size, dtype=torch.float32)
    room = torch.empty(n * K.centre_width(n, 24, torch.float32, x32.device))
    K.gram_into(x32, packed_blocks(blocks_out, layout), layout, room)
    torch.testing.assert_close(blocks_out, K.packed_gram(x32, torch.float32, layout))


def test_gram_stack_reuses_its_buffer_and_grows_past_the_expected_layers() -> None:
    g = torch.Generator().manual_seed(0)
    stack = GramStack("auto", layers=2)
    layout = BlockLayout.for_size(128)
    for batch in range(2):
        feats = [torch.randn(128, 300, generator=g), torch.randn(128, 5, generator=g)]
        feats.append(torch.randn(128, 2, 3, generator=g))  # one more than expected
        stack.start(128)
        rows = [stack(f) for f in feats]
        got = stack.stack()
        assert got.shape == (3, layout.size)
        assert got.dtype == torch.float64
        if batch == 0:
            first = got.data_ptr()
        assert got.data_ptr() == first  # grown once, then reused
        for i, f in enumerate(feats):
            dtype = torch.float64 if f[0].numel() <= 128 else torch.float32  # "auto"
            torch.testing.assert_close(got[i], K.packed_gram(f, dtype, layout).double())
        torch.testing.assert_close(rows[0], got[0])
    with pytest.raises(InputError, match=r"shape \(64, 3\) for a batch of 128"):
        stack(torch.randn(64, 3))


def _features(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    fa = [torch.randn(n, 40, generator=g), torch.randn(n, 200, generator=g).relu() + 3.0]
    fb = [torch.randn(n, 3, 5, generator=g), torch.randn(n, 150, generator=g) * 1e-3]
    return fa, fb


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("n", [100, 256])  # depth 0 and depth 2
def test_update_packed_update_grams_and_update_agree(kernel: str, n: int) -> None:
    layout = BlockLayout.for_size(n)
    metrics = [MinibatchCKA(2, 2, kernel=kernel) for _ in range(3)]
    for seed in range(2):
        fa, fb = _features(n, seed)
        metrics[0].update(fa, fb)
        grams_b = torch.stack([K.centered_gram(f, torch.float32) for f in fb])  # a stack
        metrics[1].update_grams([K.centered_gram(f, torch.float32) for f in fa], grams_b)
        pa = torch.stack([K.packed_gram(f, torch.float64, layout) for f in fa])
        pb = torch.stack([K.packed_gram(f, torch.float64, layout) for f in fb])
        before = pa.clone()
        metrics[2].update_packed(pa, pb, layout)
        torch.testing.assert_close(pa, before, rtol=0, atol=0)  # only read
    batches = [_features(n, s) for s in range(2)]
    expected = ref.minibatch_cka([b[0] for b in batches], [b[1] for b in batches], kernel)
    for metric in metrics:
        np.testing.assert_allclose(metric.compute().numpy(), expected, atol=1e-6)


def test_update_packed_refuses_stacks_of_the_wrong_shape() -> None:
    layout = BlockLayout.for_size(8)
    metric = MinibatchCKA(2, 1)
    good = torch.zeros(2, layout.size, dtype=torch.float64)
    with pytest.raises(InputError, match=r"side b expects packed Grams of shape \(1, 64\)"):
        metric.update_packed(good, torch.zeros(1, 63, dtype=torch.float64), layout)


def test_a_copied_or_pickled_metric_updates_itself_only() -> None:
    import copy
    import pickle

    layout = BlockLayout.for_size(8)
    packed = torch.stack([pack(_symmetric(1, 8, s)[0], layout) for s in range(2)])
    metric = MinibatchCKA(2, 2)
    for twin in (copy.deepcopy(metric), pickle.loads(pickle.dumps(metric))):
        twin.update_packed(packed, packed, layout)
        twin.update_grams(unpack(packed, layout), unpack(packed, layout))
        assert int(twin.num_batches) == 2
    assert int(metric.num_batches) == 0


def test_gram_stack_needs_a_batch_started_and_the_empty_gram_is_empty() -> None:
    with pytest.raises(RuntimeError, match="start"):
        GramStack()(torch.ones(4, 3))
    with pytest.raises(InputError, match="0 examples"):
        GramStack().start(0)
    assert K.centered_gram(torch.ones(0, 3), torch.float32).shape == (0, 0)
