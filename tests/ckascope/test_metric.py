from __future__ import annotations

import numpy as np
import pytest
import torch

from ckascope import MinibatchCKA, cka_matrix
from ckascope.errors import InputError, NumericalError
from tests import reference as ref


def _layers(n: int, seed: int, widths: tuple[int, ...] = (6, 9, 4)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g, dtype=torch.float64)
    out = []
    for w in widths:
        base = torch.tanh(base @ torch.randn(base.shape[1], w, generator=g, dtype=torch.float64))
        out.append(base + 0.3 * torch.randn(n, w, generator=g, dtype=torch.float64))
    return out


def _batches(
    sizes: list[int], seed: int = 0
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    a, b = [], []
    for i, n in enumerate(sizes):
        a.append(_layers(n, seed + 2 * i))
        b.append(_layers(n, seed + 2 * i, (5, 3))[::-1])
    return a, b


def _run(metric: MinibatchCKA, a: list, b: list) -> torch.Tensor:
    for fa, fb in zip(a, b, strict=True):
        metric.update(fa, fb)
    return metric.compute()


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("sizes", [[32], [16, 16], [10, 12, 10], [8] * 5])
def test_minibatch_matches_reference(kernel: str, sizes: list[int]) -> None:
    a, b = _batches(sizes)
    got = _run(MinibatchCKA(3, 2, kernel=kernel, sigma_frac=0.8), a, b)  # type: ignore[arg-type]
    expected = ref.minibatch_cka(a, b, kernel, 0.8)
    assert got.shape == (3, 2)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)


def test_single_batch_equals_debiased_cka() -> None:
    a, b = _batches([24])
    got = _run(MinibatchCKA(3, 2), a, b)
    np.testing.assert_allclose(
        got.numpy(), cka_matrix(a[0], b[0], debiased=True).numpy(), atol=1e-12
    )
    for i in range(3):
        for j in range(2):
            assert float(got[i, j]) == pytest.approx(
                ref.cka(a[0][i], b[0][j], "linear", True), abs=1e-10
            )


def test_ratio_of_means_differs_from_mean_of_ratios() -> None:
    a, b = _batches([8, 8, 8])
    got = _run(MinibatchCKA(3, 2), a, b)
    mean_of_ratios = np.mean(
        [cka_matrix(fa, fb, debiased=True).numpy() for fa, fb in zip(a, b, strict=True)], axis=0
    )
    assert np.abs(got.numpy() - mean_of_ratios).max() > 1e-4


def test_batch_order_invariance() -> None:
    a, b = _batches([9, 11, 8, 10])
    forward = _run(MinibatchCKA(3, 2), a, b)
    backward = _run(MinibatchCKA(3, 2), a[::-1], b[::-1])
    np.testing.assert_allclose(forward.numpy(), backward.numpy(), atol=1e-13)


@pytest.mark.parametrize("weighting", ["batch", "examples"])
def test_short_last_batch_weighting(weighting: str) -> None:
    a, b = _batches([16, 16, 5])
    got = _run(MinibatchCKA(3, 2, weighting=weighting), a, b)  # type: ignore[arg-type]
    weights = [1, 1, 1] if weighting == "batch" else [16, 16, 5]
    np.testing.assert_allclose(got.numpy(), ref.minibatch_cka(a, b, weights=weights), atol=1e-10)


def test_weightings_differ_only_with_unequal_batches() -> None:
    a, b = _batches([16, 16, 5])
    by_batch = _run(MinibatchCKA(3, 2, weighting="batch"), a, b)
    by_examples = _run(MinibatchCKA(3, 2, weighting="examples"), a, b)
    assert np.abs((by_batch - by_examples).numpy()).max() > 1e-4
    a, b = _batches([12, 12])
    np.testing.assert_allclose(
        _run(MinibatchCKA(3, 2, weighting="batch"), a, b).numpy(),
        _run(MinibatchCKA(3, 2, weighting="examples"), a, b).numpy(),
        atol=1e-14,
    )


def test_joint_matrix_block_equals_cross_matrix() -> None:
    a, b = _batches([12, 14])
    both = [fa + fb for fa, fb in zip(a, b, strict=True)]
    joint = _run(MinibatchCKA(5, 5), both, both)
    cross = _run(MinibatchCKA(3, 2), a, b)
    np.testing.assert_allclose(joint[:3, 3:].numpy(), cross.numpy(), atol=1e-12)
    np.testing.assert_allclose(torch.diagonal(joint).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(joint.numpy(), joint.T.numpy(), atol=1e-12)


def test_one_by_one_result_is_not_squeezed() -> None:
    a, b = _batches([10])
    metric = MinibatchCKA(1, 1)
    metric.update(a[0][:1], b[0][:1])
    assert metric.compute().shape == (1, 1)


def test_the_torchmetrics_hooks_it_relies_on_are_checked_by_name() -> None:
    from ckascope.metric import TORCHMETRICS_HOOKS, check_torchmetrics

    check_torchmetrics()  # the installed torchmetrics has them
    assert TORCHMETRICS_HOOKS == ("_wrap_update", "_wrap_compute")

    class Renamed:  # a torchmetrics whose Metric renamed one hook
        _wrap_update = staticmethod(lambda f: f)

    with pytest.raises(ImportError, match=r"Metric\._wrap_compute.*Hint"):
        check_torchmetrics(Renamed)
    a, b = _batches([10, 10])
    metric = MinibatchCKA(3, 2)
    metric.update_grams(*([(f - f.mean(0)) @ (f - f.mean(0)).T for f in fs] for fs in (a[0], b[0])))
    assert metric.update_count == 1  # the wrapped Gram entry point gets update's bookkeeping


def test_update_grams_equals_update() -> None:
    a, b = _batches([10, 10])
    via_feats = _run(MinibatchCKA(3, 2, kernel="rbf"), a, b)
    metric = MinibatchCKA(3, 2, kernel="rbf")
    for fa, fb in zip(a, b, strict=True):
        ga = torch.stack([(f - f.mean(0)) @ (f - f.mean(0)).T for f in fa])
        metric.update_grams(ga, [(f - f.mean(0)) @ (f - f.mean(0)).T for f in fb])
    np.testing.assert_allclose(metric.compute().numpy(), via_feats.numpy(), atol=1e-12)


def test_update_grams_after_compute_invalidates_cached_result() -> None:
    a, b = _batches([10, 10])
    metric = MinibatchCKA(3, 2)
    metric.update(a[0], b[0])
    first = metric.compute()
    metric.update_grams(
        [(f - f.mean(0)) @ (f - f.mean(0)).T for f in a[1]],
        [(f - f.mean(0)) @ (f - f.mean(0)).T for f in b[1]],
    )
    np.testing.assert_allclose(metric.compute().numpy(), ref.minibatch_cka(a, b), atol=1e-10)
    assert not torch.equal(first, metric.compute())


def test_fixed_bandwidth_from_first_batch() -> None:
    a, b = _batches([12, 12, 12])
    got = _run(MinibatchCKA(3, 2, kernel="rbf", bandwidth="first", sigma_frac=0.5), a, b)
    s2a = [ref.rbf_sigma2(x, 0.5) for x in a[0]]
    s2b = [ref.rbf_sigma2(y, 0.5) for y in b[0]]
    expected = ref.minibatch_cka(a, b, "rbf", 0.5, sigma2_a=s2a, sigma2_b=s2b)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    per_batch = _run(MinibatchCKA(3, 2, kernel="rbf", sigma_frac=0.5), a, b)
    assert np.abs((got - per_batch).numpy()).max() > 1e-6


def test_float32_features_within_1e6() -> None:
    a, b = _batches([20, 20, 20])
    a32 = [[f.float() * 1000 + 50 for f in fa] for fa in a]
    b32 = [[f.float() for f in fb] for fb in b]
    expected = ref.minibatch_cka(
        [[f.numpy() for f in fa] for fa in a32], [[f.numpy() for f in fb] for fb in b32]
    )
    for gram_dtype in ("auto", "float32"):
        got = _run(MinibatchCKA(3, 2, gram_dtype=gram_dtype), a32, b32)  # type: ignore[arg-type]
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


def test_reset_clears_sums_and_fixed_bandwidth() -> None:
    a, b = _batches([10, 10])
    metric = MinibatchCKA(3, 2, kernel="rbf", bandwidth="first")
    first = _run(metric, a[:1], b[:1])
    metric.reset()
    assert torch.isnan(metric.sigma2_a).all()
    assert int(metric.num_batches) == 0
    again = _run(metric, a[:1], b[:1])
    np.testing.assert_array_equal(first.numpy(), again.numpy())


def test_state_is_flat_in_number_of_batches() -> None:
    metric = MinibatchCKA(3, 2)
    a, b = _batches([8] * 6)
    sizes = []
    for fa, fb in zip(a, b, strict=True):
        metric.update(fa, fb)
        sizes.append(sum(s.numel() for s in metric.metric_state.values()))
    assert len(set(sizes)) == 1
    assert int(metric.num_batches) == 6
    assert int(metric.num_examples) == 48


def test_constant_layer_gives_nan_row_with_warning_naming_it() -> None:
    a, b = _batches([10])
    fa = [a[0][0], torch.zeros(10, 4, dtype=torch.float64), a[0][2]]
    metric = MinibatchCKA(3, 2, layer_names_a=["conv", "dead", "fc"])
    metric.update(fa, b[0])
    with pytest.warns(RuntimeWarning, match="dead"):
        out = metric.compute()
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[[0, 2]]).any()


def test_nan_features_raise_naming_the_layer() -> None:
    a, b = _batches([10])
    bad = a[0][1].clone()
    bad[3, 2] = float("nan")
    metric = MinibatchCKA(3, 2, layer_names_a=["x", "layer2.1", "z"])
    metric.update([a[0][0], bad, a[0][2]], b[0])  # checked on the device: no sync per batch
    with pytest.raises(NumericalError, match=r"layer2\.1"):
        metric.compute()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel": "poly"}, "unknown kernel"),
        ({"sigma_frac": -1.0}, "sigma_frac"),
        ({"bandwidth": "median"}, "bandwidth"),
        ({"weighting": "size"}, "weighting"),
        ({"gram_dtype": "float16"}, "gram_dtype"),
        ({"layer_names_a": ["only-one"]}, "layer names"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        MinibatchCKA(3, 2, **kwargs)


def test_bad_updates() -> None:
    metric = MinibatchCKA(1, 1)
    x = torch.randn(3, 5)
    with pytest.raises(InputError, match="at least 4"):
        metric.update([x], [x])
    with pytest.raises(InputError, match="different example counts"):
        metric.update([torch.randn(6, 2)], [torch.randn(7, 2)])
    with pytest.raises(InputError, match="expects 1 layers"):
        metric.update([x, x], [x])
    with pytest.raises(InputError, match="features must be"):
        metric.update([torch.randn(6)], [torch.randn(6, 2)])
    with pytest.raises(InputError, match="Grams of shape"):
        metric.update_grams(torch.randn(1, 5, 4), torch.randn(1, 5, 5))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_float32_gram_list_and_float64_stack_give_the_same_matrix(kernel: str) -> None:
    # A list of float32 Grams is copied layer by layer into the reused float64 workspace, a
    # float64 stack on the metric's device is read as it is; both then take the same engine.
    a, b = _batches([40, 40, 12])
    via_list, via_stack = MinibatchCKA(3, 2, kernel=kernel), MinibatchCKA(3, 2, kernel=kernel)
    for fa, fb in zip(a, b, strict=True):
        ga = [((f - f.mean(0)) @ (f - f.mean(0)).T).float() for f in fa]
        gb = [((f - f.mean(0)) @ (f - f.mean(0)).T).float() for f in fb]
        via_list.update_grams(ga, gb)
        via_stack.update_grams(torch.stack(ga).double(), torch.stack(gb).double())
    got = via_list.compute().numpy()
    np.testing.assert_allclose(got, via_stack.compute().numpy(), rtol=0, atol=1e-12)
    assert np.isfinite(got).all()


def test_caller_grams_are_never_modified() -> None:
    a, b = _batches([16])
    ga = torch.stack([(f - f.mean(0)) @ (f - f.mean(0)).T for f in a[0]])
    gb = [(f - f.mean(0)) @ (f - f.mean(0)).T for f in b[0]]
    before_a, before_b = ga.clone(), [g.clone() for g in gb]
    metric = MinibatchCKA(3, 2)
    metric.update_grams(ga, gb)
    metric.update_grams(ga, gb)
    torch.testing.assert_close(ga, before_a, rtol=0, atol=0)
    for g, old in zip(gb, before_b, strict=True):
        torch.testing.assert_close(g, old, rtol=0, atol=0)


def test_a_metric_updated_in_inference_mode_keeps_working_outside_it() -> None:
    a, b = _batches([12, 12])
    metric = MinibatchCKA(3, 2)
    with torch.inference_mode():
        metric.update(a[0], b[0])
    with torch.no_grad():  # the reused workspace must not be an inference tensor
        metric.update(a[1], b[1])
    torch.testing.assert_close(metric.compute(), _run(MinibatchCKA(3, 2), a, b))


def test_the_engine_refuses_batches_of_fewer_than_four() -> None:
    from ckascope.functional import hsic1_terms

    k = torch.eye(3, dtype=torch.float64)[None]
    with pytest.raises(InputError, match="at least 4"):
        hsic1_terms(k, k)
