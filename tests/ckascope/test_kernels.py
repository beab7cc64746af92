from __future__ import annotations

import numpy as np
import pytest
import torch

from ckascope import kernels as K
from ckascope.errors import InputError
from ckascope.functional import hsic1_terms, packed_hsic1_terms
from ckascope.packing import BlockLayout, pack
from tests import reference as ref


def _x(n: int = 12, p: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 101, 1000])
def test_numpy_median_matches_numpy_even_and_odd(m: int) -> None:
    values = torch.randint(0, 5, (3, m), generator=torch.Generator().manual_seed(m)).double()
    values += torch.rand(3, m, generator=torch.Generator().manual_seed(1)).round(decimals=1)
    expected = np.median(values.numpy(), axis=-1)
    np.testing.assert_array_equal(K.numpy_median(values).numpy(), expected)


def test_numpy_median_beyond_quantile_limit() -> None:
    # n = 4098 examples -> n² = 16.8M entries > 2**24, where older torch.quantile refuses.
    m = 4098 * 4098
    values = torch.rand(m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(K.numpy_median(values)) == float(np.median(values.numpy()))


def test_sq_dists_and_rbf_match_reference() -> None:
    x = _x()
    np.testing.assert_allclose(K.sq_dists(x).numpy(), ref.sq_distances(x), atol=1e-12)
    for f in (0.3, 1.0, 2.0):
        np.testing.assert_allclose(K.rbf_gram(x, f).numpy(), ref.rbf_kernel(x, f), atol=1e-12)


def test_rbf_gram_is_batched_over_leading_dims() -> None:
    xs = torch.stack([_x(seed=s) for s in range(3)])  # (3, n, p)
    batched = K.rbf_gram(xs, 0.7)
    for i in range(3):
        np.testing.assert_allclose(batched[i].numpy(), ref.rbf_kernel(xs[i], 0.7), atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "rbf"])
def test_hsic_estimators_match_reference(name: str) -> None:
    x, y = _x(10, 5, 1), _x(10, 9, 2)
    k = K.linear_gram(x) if name == "linear" else K.rbf_gram(x)
    l = K.linear_gram(y) if name == "linear" else K.rbf_gram(y)  # noqa: E741
    kr, lr = ref.kernel(x, name), ref.kernel(y, name)
    assert float(K.hsic0(k, l)) == pytest.approx(ref.hsic0(kr, lr), rel=1e-12, abs=1e-14)
    assert float(K.hsic1(k, l)) == pytest.approx(ref.hsic1(kr, lr), rel=1e-12, abs=1e-14)


def test_hsic_batched_over_leading_dims() -> None:
    ks = torch.stack([K.linear_gram(_x(seed=s)) for s in range(4)]).reshape(2, 2, 12, 12)
    ls = torch.stack([K.linear_gram(_x(seed=10 + s)) for s in range(4)]).reshape(2, 2, 12, 12)
    got = K.hsic1(ks, ls)
    assert got.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            assert float(got[i, j]) == pytest.approx(ref.hsic1(ks[i, j].numpy(), ls[i, j].numpy()))


def test_ucentred_matrix_has_zero_diagonal_and_row_sums() -> None:
    u = K.ucenter_gram(K.rbf_gram(_x()))
    np.testing.assert_allclose(torch.diagonal(u).numpy(), 0.0, atol=0)
    np.testing.assert_allclose(u.sum(dim=1).numpy(), 0.0, atol=1e-12)


def test_hsic1_can_be_negative_and_ignores_constant_row_shift() -> None:
    values = []
    for seed in range(20):
        x, y = _x(8, 3, seed), _x(8, 3, 100 + seed)
        values.append(float(K.hsic1(K.linear_gram(x), K.linear_gram(y))))
        shifted = float(K.hsic1(K.linear_gram(x + 5.0), K.linear_gram(y - 3.0)))
        assert shifted == pytest.approx(values[-1], rel=1e-9, abs=1e-12)
    assert min(values) < 0 < max(values)


def test_hsic1_needs_four_examples() -> None:
    with pytest.raises(InputError, match="n >= 4"):
        K.ucenter_gram(torch.eye(3, dtype=torch.float64))


def test_centered_gram_equals_double_centred_linear_kernel() -> None:
    x = _x() * 10 + 100
    got = K.centered_gram(x, torch.float64)
    expected = K.center_gram(K.linear_gram(x))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-9)


@pytest.mark.parametrize("chunk_bytes", [1, 300, 2000])
def test_centred_gram_in_column_chunks_is_the_reference_gram(
    monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    # CPU features are centred a chunk of columns at a time (1, 4 or 27 float64 columns of 9
    # examples here, 8 or 55 float32 ones): every width, a remainder chunk, 4-D, half-precision
    # and channels-last features must give the Gram of the whole centred features.
    monkeypatch.setattr(K, "CENTER_CHUNK_BYTES", chunk_bytes)
    x = torch.randn(9, 2, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    far = x * 0.01 + 50.0  # a spread far below the mean: centring keeps the digits
    expected = ref.linear_kernel(far.numpy())
    np.testing.assert_allclose(K.centered_gram(far, torch.float64).numpy(), expected, atol=1e-14)
    for x32 in ((x + 1.0).float(), (x + 1.0).float().to(memory_format=torch.channels_last)):
        expected = ref.linear_kernel(x32.double().numpy())
        got32 = K.centered_gram(x32, torch.float32).double().numpy()
        np.testing.assert_allclose(got32, expected, atol=1e-6 * np.abs(expected).max())
    half = (x + 1.0).bfloat16()
    expected = ref.linear_kernel(half.double().numpy())
    got = K.centered_gram(half, torch.float64).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12 * np.abs(expected).max())


def test_kernel_from_gram_uses_fixed_sigma() -> None:
    x = _x()
    gram = K.centered_gram(x, torch.float64)
    k, s2 = K.kernel_from_gram(gram, "rbf", 1.0, torch.tensor(3.0, dtype=torch.float64))
    assert float(s2) == 3.0
    np.testing.assert_allclose(k.numpy(), ref.rbf_kernel(x, sigma2=3.0), atol=1e-12)


def test_cka_from_hsic_marks_non_positive_self_terms_nan() -> None:
    cross = torch.ones(2, 2, dtype=torch.float64)
    out = K.cka_from_hsic(
        cross, torch.tensor([1.0, 0.0]).double(), torch.tensor([4.0, -1.0]).double()
    )
    assert float(out[0, 0]) == 0.5
    assert torch.isnan(out[1]).all()
    assert torch.isnan(out[:, 1]).all()


@pytest.mark.parametrize(("kernel", "frac"), [("poly", 1.0), ("linear", 0.0), ("rbf", -1.0)])
def test_check_kernel_rejects_bad_values(kernel: str, frac: float) -> None:
    with pytest.raises(InputError):
        K.check_kernel(kernel, frac)


def test_tf32_is_off_inside_and_inheritance_survives() -> None:
    import torch

    from ckascope.kernels import ieee_fp32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: the legacy allow_tf32 flags")
    generic = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"  # a user who enabled TF32 globally
        with ieee_fp32("matmul", "conv"):
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        torch.backends.fp32_precision = "ieee"  # a later global change still applies
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        torch.backends.fp32_precision = generic


def test_a_comparison_runs_its_convolutions_without_tf32_unless_asked() -> None:
    import torch

    from ckascope import models
    from ckascope.compare import compare_scales

    model = models.build_model("resnet18", "none", num_classes=10)
    seen: list[str] = []
    conv = torch.backends.cudnn.conv
    model.conv1.register_forward_hook(lambda *_: seen.append(str(conv.fp32_precision)))
    kwargs = {"layers": ["layer1"], "image_size": 32, "num_images": 8, "batch_size": 8}
    exact = compare_scales(model, None, (16, 32), **kwargs)
    fast = compare_scales(model, None, (16, 32), tf32=True, **kwargs)
    assert seen[:2] == ["ieee", "ieee"]
    assert "ieee" not in seen[2:]
    assert (exact.settings["tf32"], fast.settings["tf32"]) == (False, True)


@pytest.mark.parametrize("n", [5, 64, 70])  # 70² is not a multiple of the CPU product's slices
def test_batched_hsic1_terms_match_reference_for_every_pair(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    ka = torch.stack([K.rbf_gram(torch.randn(n, 6, generator=g, dtype=torch.float64))] * 2)
    ka[1] = K.linear_gram(torch.randn(n, 3, generator=g, dtype=torch.float64) + 4.0)
    kb = torch.stack([K.linear_gram(torch.randn(n, 9, generator=g, dtype=torch.float64))] * 3)
    kb[1], kb[2] = K.rbf_gram(kb[0]), kb[0] * 2 + 1.0
    cross, self_a, self_b = hsic1_terms(ka, kb)
    # Every packing gives the same terms, up to the order of the float64 sums.
    scale = float(torch.cat([self_a, self_b]).abs().max())
    for depth in [d for d in range(3) if n % 2**d == 0]:
        layout = BlockLayout(n, depth)
        again = packed_hsic1_terms(pack(ka, layout), pack(kb, layout), layout)
        for got, other in zip((cross, self_a, self_b), again, strict=True):
            torch.testing.assert_close(got, other, rtol=0, atol=1e-13 * scale)
    ka_np, kb_np = ka.numpy(), kb.numpy()
    # Both sides evaluate the same float64 sum in different orders; the +4 shift (uncentred
    # features) makes its terms cancel, which costs both ~1e-11 of the value at n = 5.
    for i in range(2):
        assert float(self_a[i]) == pytest.approx(ref.hsic1(ka_np[i], ka_np[i]), rel=1e-9)
        for j in range(3):
            want = ref.hsic1(ka_np[i], kb_np[j])
            assert float(cross[i, j]) == pytest.approx(want, rel=1e-9, abs=1e-12)
    for j in range(3):
        assert float(self_b[j]) == pytest.approx(ref.hsic1(kb_np[j], kb_np[j]), rel=1e-9)
