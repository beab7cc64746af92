from __future__ import annotations

import numpy as np
import pytest
import torch

from ckascope import cka, cka_matrix
from ckascope.errors import InputError, NumericalError
from tests import reference as ref

CASES = [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)]


def _pair(n: int = 40, p: int = 30, q: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, p))
    y = np.tanh(x[:, :q] @ r.standard_normal((q, q))) + 0.5 * r.standard_normal((n, q))
    return x, y


@pytest.mark.parametrize(("kernel", "debiased"), CASES)
@pytest.mark.parametrize("sigma_frac", [0.4, 1.0])
def test_cka_matches_reference_float64(kernel: str, debiased: bool, sigma_frac: float) -> None:
    x, y = _pair()
    got = cka(x, y, kernel=kernel, debiased=debiased, sigma_frac=sigma_frac)  # type: ignore[arg-type]
    assert got == pytest.approx(ref.cka(x, y, kernel, debiased, sigma_frac), abs=1e-10)


@pytest.mark.parametrize(("kernel", "debiased"), CASES)
def test_cka_from_float32_and_half_inputs(kernel: str, debiased: bool) -> None:
    x, y = _pair(seed=3)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    expected = ref.cka(x32, y32, kernel, debiased)
    assert cka(
        torch.from_numpy(x32), torch.from_numpy(y32), kernel=kernel, debiased=debiased
    ) == pytest.approx(expected, abs=1e-6)  # type: ignore[arg-type]
    xh, yh = torch.from_numpy(x).half(), torch.from_numpy(y).bfloat16()
    expected_h = ref.cka(xh.float().numpy(), yh.float().numpy(), kernel, debiased)
    assert cka(xh, yh, kernel=kernel, debiased=debiased) == pytest.approx(expected_h, abs=1e-6)  # type: ignore[arg-type]


def test_cka_flattens_trailing_dims() -> None:
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randn(16, 5, 2, generator=torch.Generator().manual_seed(1))
    assert cka(x, y) == pytest.approx(ref.cka(x.numpy(), y.numpy()), abs=1e-6)


@pytest.mark.parametrize(("kernel", "debiased"), CASES)
def test_properties_self_symmetry_invariances(kernel: str, debiased: bool) -> None:
    x, y = _pair(seed=5)
    kw = {"kernel": kernel, "debiased": debiased}
    assert cka(x, x, **kw) == pytest.approx(1.0, abs=1e-12)  # type: ignore[arg-type]
    base = cka(x, y, **kw)  # type: ignore[arg-type]
    assert cka(y, x, **kw) == pytest.approx(base, abs=1e-12)  # type: ignore[arg-type]
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((x.shape[1], x.shape[1])))
    assert cka(x @ q, y, **kw) == pytest.approx(base, abs=1e-10)  # type: ignore[arg-type]
    assert cka(7.5 * x, y, **kw) == pytest.approx(base, abs=1e-10)  # type: ignore[arg-type]
    assert cka(x + 3.0, y - 100.0, **kw) == pytest.approx(base, abs=1e-9)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kernel", "debiased"), CASES)
def test_not_invariant_to_general_invertible_map(kernel: str, debiased: bool) -> None:
    x, y = _pair(seed=6)
    a = np.diag(np.geomspace(0.01, 10.0, x.shape[1])) @ np.random.default_rng(2).standard_normal(
        (x.shape[1],) * 2
    )
    assert np.linalg.matrix_rank(a) == x.shape[1]
    kw = {"kernel": kernel, "debiased": debiased}
    assert abs(cka(x @ a, y, **kw) - cka(x, y, **kw)) > 1e-2  # type: ignore[arg-type]


def test_cka_matrix_matches_pairwise_cka() -> None:
    xs = [_pair(seed=s)[0] for s in range(3)]
    ys = [_pair(seed=s)[1] for s in range(2)]
    m = cka_matrix(xs, ys, debiased=True)
    assert m.shape == (3, 2)
    assert m.dtype == torch.float64
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(m[i, j]) == pytest.approx(ref.cka(x, y, "linear", True), abs=1e-10)


def test_constant_representation_gives_nan_and_warning() -> None:
    x, _ = _pair()
    with pytest.warns(RuntimeWarning, match="feats_a"):
        assert np.isnan(cka(np.ones_like(x), x))


@pytest.mark.parametrize(
    ("x", "y", "kw", "error", "match"),
    [
        (np.ones((10, 3)), np.ones((11, 3)), {}, InputError, "same examples"),
        (np.ones(10), np.ones((10, 3)), {}, InputError, r"shape \(n, \.\.\.\)"),
        (np.ones((3, 2)), np.ones((3, 2)), {"debiased": True}, InputError, "at least 4"),
        (np.full((5, 2), np.nan), np.ones((5, 2)), {}, NumericalError, "NaN"),
        (np.ones((5, 2)), np.array([[np.inf, 0]] * 5), {}, NumericalError, "NaN or Inf"),
        (np.ones((5, 2)), np.ones((5, 2)), {"kernel": "cosine"}, InputError, "unknown kernel"),
        (
            np.ones((5, 2)),
            np.ones((5, 2)),
            {"kernel": "rbf", "sigma_frac": 0.0},
            InputError,
            "sigma_frac",
        ),
    ],
)
def test_bad_input_raises_typed_errors(
    x: np.ndarray, y: np.ndarray, kw: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        cka(x, y, **kw)


def test_the_batched_reference_is_the_pairwise_reference() -> None:
    # The benchmarks score every tool against ref.hsic1_pairs / hsic0_pairs: they must be the
    # naive per-pair formulas, written for many layers at once.
    rng = np.random.default_rng(0)
    grams_a = np.stack([ref.linear_kernel(rng.normal(size=(9, d))) for d in (3, 20)])
    grams_b = np.stack([ref.rbf_kernel(rng.normal(size=(9, 5))) for _ in range(3)])
    for pairs, single in ((ref.hsic1_pairs, ref.hsic1), (ref.hsic0_pairs, ref.hsic0)):
        got = pairs(grams_a, grams_b)
        want = [[single(k, l) for l in grams_b] for k in grams_a]  # noqa: E741
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    ratio = ref.cka_ratio(np.ones((2, 2)), np.array([4.0, 0.0]), np.array([1.0, 9.0]))
    np.testing.assert_array_equal(ratio, [[0.5, 1 / 6], [np.nan, np.nan]])
