"""Bootstrap intervals and the permutation null against a direct NumPy computation (the same
resamples and permutations given explicitly), and their properties on data whose answer is known.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckascope import CKAResult, MinibatchCKA
from ckascope.calibration import (
    BatchTerms,
    Resamples,
    SweepSummary,
    batch_permutations,
    bootstrap_replicates,
    calibrate,
    draw_resamples,
    effective_draws,
    null_summary,
    percentile_interval,
    permuted_cross_terms,
    pool,
)
from ckascope.cli import main as ckascope_main
from ckascope.packing import BlockLayout, pack
from ckascope.plot import curve, heatmap
from tests import reference as ref
from tests.ckascope.test_metric import _batches


def _kernels(count: int, n: int, seed: int) -> torch.Tensor:
    """(count, n, n) float64 Grams of random centred features (symmetric, not centred Grams)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, n, 7, generator=g, dtype=torch.float64)
    return x @ x.transpose(1, 2) + 0.5  # the shift keeps the formula's every term at work


@pytest.mark.parametrize("n", [8, 130, 256])  # depth 0, and packed layouts with upper blocks
def test_shuffled_cross_terms_equal_hsic1_of_the_permuted_kernels(n: int) -> None:
    layout = BlockLayout.for_size(n)
    ka, kb = _kernels(3, n, 0), _kernels(2, n, 1)
    perms = torch.stack(
        [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    )
    got = permuted_cross_terms(pack(ka, layout), pack(kb, layout), layout, perms)
    for t, p in enumerate(perms.numpy()):
        shuffled = kb.numpy()[:, p][:, :, p]  # P L Pᵀ
        np.testing.assert_allclose(
            got[t].numpy(), ref.hsic1_pairs(ka.numpy(), shuffled), rtol=1e-10
        )


def _numpy_cka(terms: BatchTerms, counts: np.ndarray) -> np.ndarray:
    """Minibatch CKA of batches taken ``counts`` times each: weighted sums, then the ratio."""
    cross = np.einsum("b,bij->ij", counts, terms.cross.numpy())
    return ref.cka_ratio(cross, counts @ terms.self_a.numpy(), counts @ terms.self_b.numpy())


def _sweep_terms(sizes: list[int], seed: int) -> BatchTerms:
    a, b = _batches(sizes, seed)
    metric = MinibatchCKA(3, 2, keep_batches=True)
    for fa, fb in zip(a, b, strict=True):
        metric.update(fa, fb)
    batches = metric.summary().batches
    assert batches is not None
    return batches


def test_bootstrap_replicates_equal_numpy_on_the_same_resamples() -> None:
    sweeps = [_sweep_terms([9, 10, 8], 0), _sweep_terms([12, 7], 5)]
    pooled = pool(sweeps)
    assert len(pooled) == 5
    counts = torch.tensor([[2, 0, 1, 1, 0], [0, 0, 0, 2, 2], [1, 1, 1, 1, 1]], dtype=torch.float64)
    got = bootstrap_replicates(pooled, Resamples(counts)).numpy()
    for r in range(3):
        np.testing.assert_allclose(got[r], _numpy_cka(pooled, counts[r].numpy()), rtol=1e-12)


def test_resamples_draw_the_effective_number_of_pooled_batches() -> None:
    draws = draw_resamples(pooled=12, draws=7, replicates=2000, seed=1)
    assert draws.counts.shape == (2000, 12)
    assert (draws.counts.sum(dim=1) == 7).all()
    assert draws.counts.mean(dim=0).allclose(
        torch.full((12,), 7 / 12, dtype=torch.float64), atol=0.05
    )
    assert torch.equal(draw_resamples(12, 7, 2000, seed=1).counts, draws.counts)
    # the same images re-batched: one sweep's worth; no images in common: all of them
    assert effective_draws([10] * 10, overlap=1.0) == 10
    assert effective_draws([10] * 10, overlap=0.0) == 100
    assert effective_draws([10] * 10, overlap=0.128) == round(10 * 10 / (1 + 9 * 0.128))
    assert effective_draws([4], overlap=1.0) == 4


def _population_sweep(gen: torch.Generator, images: torch.Tensor, batches: int) -> SweepSummary:
    """One sweep over ``images`` (N, 2, 6) in random batches: layer 0 and a noisy layer 1."""
    order = torch.randperm(len(images), generator=gen)
    metric = MinibatchCKA(1, 1, keep_batches=True)
    for k, part in enumerate(order.chunk(batches)):
        x = images[part]
        metric.update([x[:, 0]], [x[:, 0] + 1.5 * x[:, 1]], batch=k)
    return metric.summary()


@pytest.mark.parametrize("same_images", [True, False])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_the_interval_has_the_width_of_the_mean_over_sweeps(same_images: bool) -> None:
    """Monte Carlo: the spread of the reported value over many experiments, against the
    bootstrap's spread in one, for sweeps that re-batch the same images or draw new ones."""
    gen = torch.Generator().manual_seed(0)
    sweeps, batches, n = 4, 5, 16

    def experiment() -> list[SweepSummary]:
        pool_size = batches * n * (1 if same_images else sweeps)
        images = torch.randn(pool_size, 2, 6, generator=gen, dtype=torch.float64)
        parts = [images] * sweeps if same_images else list(images.chunk(sweeps))
        return [_population_sweep(gen, part, batches) for part in parts]

    means = [float(torch.stack([s.matrix for s in experiment()]).mean()) for _ in range(300)]
    widths = []
    for seed in range(20):
        summaries = experiment()
        draws = effective_draws([batches] * sweeps, 1.0 if same_images else 0.0)
        boot = bootstrap_replicates(
            pool([s.batches for s in summaries]),
            draw_resamples(len(summaries) * batches, draws, 400, seed),
        )  # type: ignore[misc]
        widths.append(float(boot.std()))
    ratio = np.mean(widths) / np.std(means, ddof=1)
    assert 0.7 < ratio < 1.4, ratio  # resampling each sweep apart gives 0.5 for the same images


def test_the_metric_null_equals_numpy_on_the_batch_permutations() -> None:
    sizes = [9, 10, 8]
    a, b = _batches(sizes)
    metric = MinibatchCKA(3, 2, permutations=4, seed=7)
    for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
        metric.update(fa, fb, batch=10 + i)
    null = metric.summary().null
    assert null is not None
    cross = np.zeros((4, 3, 2))
    self_a, self_b = np.zeros(3), np.zeros(2)
    for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
        ka = np.stack([ref.linear_kernel(x) for x in fa])
        kb = np.stack([ref.linear_kernel(y) for y in fb])
        perms = batch_permutations(4, sizes[i], seed=7, batch=10 + i).numpy()
        for t, p in enumerate(perms):
            cross[t] += ref.hsic1_pairs(ka, kb[:, p][:, :, p])
        self_a += np.diag(ref.hsic1_pairs(ka, ka))
        self_b += np.diag(ref.hsic1_pairs(kb, kb))
    expected = np.stack([ref.cka_ratio(c, self_a, self_b) for c in cross])
    np.testing.assert_allclose(null.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_null_summary_p_values_count_the_observed_pairing() -> None:
    null = torch.tensor([[[0.1]], [[0.3]], [[0.2]], [[0.5]]], dtype=torch.float64)
    observed = torch.tensor([[0.3]], dtype=torch.float64)
    s = null_summary(observed, null)
    assert float(s.p_value) == pytest.approx((1 + 2) / 5)  # 0.3 and 0.5 reach it
    assert float(s.mean) == pytest.approx(0.275)
    assert float(s.z_score) == pytest.approx((0.3 - 0.275) / np.std([0.1, 0.3, 0.2, 0.5], ddof=1))
    nan = null_summary(torch.tensor([[float("nan")]]), null)
    assert np.isnan(float(nan.p_value))


def test_the_interval_is_percentile_and_always_holds_the_estimate() -> None:
    reps = torch.arange(1, 101, dtype=torch.float64)[:, None, None]  # (100, 1, 1): 1..100
    low, high = percentile_interval(reps, torch.tensor([[50.0]], dtype=torch.float64), 0.9)
    assert float(low) == pytest.approx(np.quantile(np.arange(1, 101), 0.05))
    assert float(high) == pytest.approx(np.quantile(np.arange(1, 101), 0.95))
    low, high = percentile_interval(reps, torch.tensor([[200.0]], dtype=torch.float64), 0.9)
    assert float(high) == 200.0  # widened to reach an estimate outside the replicates' range


def _calibrated(feats_a: list, feats_b: list, permutations: int, bootstrap: int) -> dict:
    metric = MinibatchCKA(
        len(feats_a[0]), len(feats_b[0]), keep_batches=True, permutations=permutations
    )
    for i, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
        metric.update(fa, fb, batch=i)
    summary = metric.summary()
    return {"matrix": summary.matrix.numpy(), **calibrate([summary], bootstrap, 0.95, 0)[0]}


def test_identical_sides_give_one_with_a_zero_width_interval() -> None:
    a, _ = _batches([10, 12, 9, 11])
    c = _calibrated(a, a, permutations=5, bootstrap=200)
    diag = np.arange(3)
    np.testing.assert_allclose(c["matrix"][diag, diag], 1.0, atol=1e-12)
    np.testing.assert_allclose(c["ci_low"][diag, diag], 1.0, atol=1e-12)
    np.testing.assert_allclose(c["ci_high"][diag, diag], 1.0, atol=1e-12)
    assert (c["ci_low"] <= c["matrix"]).all()
    assert (c["matrix"] <= c["ci_high"]).all()
    assert (c["p_value"][diag, diag] == 1 / 6).all()  # nothing shuffled reaches 1


def test_a_rotated_and_scaled_copy_stays_at_one_far_above_its_null() -> None:
    a, _ = _batches([16, 16, 16, 16], seed=3)
    q, _ = torch.linalg.qr(
        torch.randn(9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    rotated = [[x[1] @ q * 3.0] for x in a]  # layer 1 (width 9), rotated and scaled
    c = _calibrated([[x[1]] for x in a], rotated, permutations=19, bootstrap=100)
    assert c["matrix"][0, 0] == pytest.approx(1.0, abs=1e-12)
    assert c["ci_low"][0, 0] == pytest.approx(1.0, abs=1e-12)
    assert c["p_value"][0, 0] == pytest.approx(1 / 20)
    assert c["z_score"][0, 0] > 10


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_independent_features_score_near_zero_with_uniform_p_values() -> None:
    p_values, z_scores = [], []
    for seed in range(150):
        g = torch.Generator().manual_seed(1000 + seed)
        a = [[torch.randn(12, 20, generator=g, dtype=torch.float64)] for _ in range(4)]
        b = [[torch.randn(12, 30, generator=g, dtype=torch.float64)] for _ in range(4)]
        c = _calibrated(a, b, permutations=19, bootstrap=0)
        p_values.append(c["p_value"][0, 0])
        z_scores.append(c["z_score"][0, 0])
    p = np.array(p_values)
    assert abs(p.mean() - 0.5) < 0.08  # uniform on {1/20, ..., 1}: mean 0.525
    assert (p <= 0.05).mean() < 0.11  # the test's level, within sampling noise of 150 draws
    assert abs(np.mean(z_scores)) < 0.3


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_compare_writes_calibration_and_suggest_split_reports_stability(tmp_path: Path) -> None:
    out = tmp_path / "r18"
    args = ["compare", "--model", "resnet18", "--weights", "none", "--scales", "32", "64"]
    args += ["--image-size", "64", "--num-images", "64", "--batch-size", "16"]
    args += ["--bootstrap", "200", "--permutations", "10", "--out", str(out), "--no-figures"]
    result = CliRunner().invoke(ckascope_main, args)
    assert result.exit_code == 0, result.output
    r = CKAResult.load(out)
    low, high = r.cell("ci_low"), r.cell("ci_high")
    assert low is not None
    assert high is not None
    assert (low <= r.matrix).all()
    assert (r.matrix <= high).all()
    assert all(r.cell(k) is not None for k in ("null_mean", "null_std", "p_value", "z_score"))
    assert r.calibration["bootstrap_diagonal"].shape == (200, len(r.layers_a))
    assert (r.settings["bootstrap"], r.settings["permutations"], r.settings["ci"]) == (
        200,
        10,
        0.95,
    )
    assert {"ci_low", "p_value"} <= set(r.to_frame().columns)
    split = CliRunner().invoke(ckascope_main, ["suggest-split", "--from", str(out)])
    assert split.exit_code == 0, split.output
    assert "bootstrap resamples" in split.output
    assert "stability" in split.output


def test_results_without_calibration_still_load_draw_and_say_stability_is_unknown() -> None:
    from ckascope.split import suggest_split

    old = CKAResult.load(Path(__file__).parents[2] / "figures" / "data" / "cka_vanilla")
    assert old.calibration == {}
    curve(old)
    heatmap(old)
    text = suggest_split(old, ["layer1", "layer2", "layer3", "layer4"]).stability_text()
    assert text.startswith("stability unknown")
    assert "--bootstrap" in text


def _one_batch_options() -> dict[str, object]:
    return {"image_size": 32, "num_images": 8, "batch_size": 8, "layers": "stages"}


def test_one_batch_warns_the_caller_that_it_cannot_be_bootstrapped() -> None:
    from ckascope import compare_scales
    from ckascope.errors import CKAScopeWarning
    from ckascope.models import build_model

    model = build_model("resnet18", "none", num_classes=4, seed=0)
    with pytest.warns(CKAScopeWarning, match="1 batch") as caught:
        result = compare_scales(model, None, (16, 32), bootstrap=10, **_one_batch_options())  # type: ignore[arg-type]
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]  # this call's line
    assert issubclass(caught[0].category, RuntimeWarning)  # what callers filtered before
    assert np.isnan(result.cell("ci_low")).all()  # type: ignore[arg-type]


def test_one_batch_is_a_one_line_note_on_the_command_line(tmp_path: Path) -> None:
    args = ["compare", "--model", "resnet18", "--weights", "none", "--scales", "16", "32"]
    args += ["--image-size", "32", "--num-images", "8", "--batch-size", "8", "--layers", "stages"]
    args += ["--bootstrap", "10", "--no-figures", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(ckascope_main, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    notes = [line for line in lines if "bootstrapped" in line]
    assert notes == [
        "note: 1 batch(es) cannot be bootstrapped: no interval. Hint: more images or a smaller "
        "--batch-size"
    ]
    progress = [line for line in lines if line.startswith("CKA: ")]
    assert lines.index(notes[0]) < lines.index(progress[0])  # said at the start, from the plan
    assert "Warning" not in result.stderr  # no category, file or source line
    assert ".py:" not in result.stderr


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        ("--permutations", "Hint: --permutations 10000 or fewer (e.g. 100)"),
        ("--bootstrap", "Hint: --bootstrap 10000 or fewer (e.g. 1000)"),
    ],
)
def test_counts_beyond_the_most_are_refused_before_any_work(
    tmp_path: Path, flag: str, needle: str
) -> None:
    from ckascope import SweepOptions
    from ckascope.errors import InputError
    from tests.refusals import assert_refused

    args = ["compare", "--model", "resnet18", "--weights", "none", "--image-size", "32"]
    args += ["--num-images", "16", "--batch-size", "16", flag, "100000000"]
    line = assert_refused(ckascope_main, [*args, "--out", str(tmp_path / "o")], needle, tmp_path)
    assert f"{flag} 100000000 is more than 10000, the most a sweep takes" in line
    with pytest.raises(InputError, match=f"{flag} 10001 is more than 10000"):
        SweepOptions(**{flag[2:]: 10001})  # the library refuses it alike
    SweepOptions(**{flag[2:]: 10000})


def test_a_calibration_too_large_to_hold_is_refused_before_the_first_batch() -> None:
    """1000 x 1000 layer pairs, 10 sweeps of 10 000 permutations: 1.6 TiB, more than any
    machine this runs on has."""
    from ckascope import compare_scales
    from ckascope.calibration import check_calibration_size, memory_bytes
    from ckascope.errors import InputError

    wide = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), *(torch.nn.ReLU() for _ in range(999)))
    ran: list[int] = []
    wide.register_forward_pre_hook(lambda m, i: ran.append(1))
    # 9 images leave 1 out of every batch: a note a run would get, but a refused one does not
    options = {"image_size": 8, "num_images": 9, "batch_size": 8, "layers": "leaves"}
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        with pytest.raises(InputError) as caught:
            compare_scales(wide, None, (4, 8), permutations=10000, repeats=10, **options)  # type: ignore[arg-type]
    assert notes == []
    limit = memory_bytes()
    fit = limit // (8 * 1000 * 1000) // 21  # the nulls' stack: (2 x 10 + 1) x permutations
    assert str(caught.value) == (
        "--permutations 10000 over 10 sweep(s) of 1000 x 1000 layer pairs would hold about "
        f"{21 * 10000 * 8e6 / 2**30:.1f} GiB of matrices at once, more than this machine's "
        f"{limit / 2**30:.1f} GiB. Hint: --permutations {fit} or fewer, fewer --repeats, or "
        "fewer layers (--layers stages has the fewest)"
    )
    assert ran == []  # no forward pass ran
    check_calibration_size(0, fit, 10, 1000, 1000)  # the hint's count fits
    with pytest.raises(InputError, match=r"--bootstrap 10000 over 2 sweep\(s\) .* --bootstrap"):
        check_calibration_size(10000, 0, 2, 1000, 1000)  # the bootstrap's share does not grow


def test_the_calibration_peak_is_the_larger_of_its_two_phases() -> None:
    """While bootstrapping: S nulls and 3 R; then 2 S + 1 nulls beside the R replicates."""
    from ckascope.calibration import calibration_matrices

    assert calibration_matrices(1000, 100, 10) == 10 * 100 + 3 * 1000  # the bootstrap's phase
    assert calibration_matrices(100, 1000, 10) == 21 * 1000 + 100  # the nulls' stack
    assert calibration_matrices(0, 0, 3) == 0


def test_one_permutation_has_no_null_std_and_no_z_score() -> None:
    observed = torch.tensor([[0.3]], dtype=torch.float64)
    s = null_summary(observed, torch.tensor([[[0.1]]], dtype=torch.float64))
    assert np.isnan(float(s.std))  # ddof 1 of one replicate, not 0
    assert np.isnan(float(s.z_score))
    assert float(s.p_value) == pytest.approx(0.5)  # 1 / (1 + 1): the observed pairing counts


def test_too_few_permutations_to_reach_five_percent_get_a_note() -> None:
    from ckascope.calibration import coarse_null_note

    note = coarse_null_note(10)
    assert note is not None
    assert "smallest possible p-value is 1/11 = 0.0909: no cell can reach p <= 0.05" in note
    assert "Hint: --permutations 19 or more" in note
    assert "1/2 = 0.5" in (coarse_null_note(1) or "")
    assert [coarse_null_note(m) for m in (0, 19, 20, 1000)] == [None] * 4


def test_too_few_bootstrap_replicates_for_the_intervals_tails_get_a_note() -> None:
    from ckascope.calibration import coarse_bootstrap_note

    note = coarse_bootstrap_note(1, 0.95)
    assert note is not None
    assert "with 1 bootstrap replicate(s) the 95% interval has less than one replicate" in note
    assert "Hint: --bootstrap 40 or more" in note  # 40 x 2.5 % = 1 in each tail
    assert coarse_bootstrap_note(39, 0.95) is not None
    assert "--bootstrap 20 or more" in (coarse_bootstrap_note(5, 0.9) or "")
    assert [coarse_bootstrap_note(b, 0.95) for b in (0, 40, 1000)] == [None] * 3


def test_the_command_line_notes_coarse_p_values_and_writes_one_permutations_std_as_missing(
    tmp_path: Path,
) -> None:
    import json

    import pandas as pd

    args = ["compare", "--model", "resnet18", "--weights", "none", "--scales", "16", "32"]
    args += ["--image-size", "32", "--num-images", "8", "--batch-size", "8", "--layers", "stages"]
    args += ["--no-figures"]
    one = CliRunner().invoke(
        ckascope_main, [*args, "--permutations", "1", "--out", str(tmp_path / "1")]
    )
    assert one.exit_code == 0, one.output
    assert "note: with 1 permutation(s) the smallest possible p-value is 1/2 = 0.5" in one.stderr
    assert "bootstrap" not in one.stderr  # no bootstrap asked, nothing to note
    boot = [*args, "--num-images", "16", "--bootstrap", "1", "--out", str(tmp_path / "b1")]
    done = CliRunner().invoke(ckascope_main, boot)
    assert done.exit_code == 0, done.output
    assert "note: with 1 bootstrap replicate(s) the 95% interval" in done.stderr
    saved = json.loads((tmp_path / "1" / "result.json").read_text())
    assert {v for row in saved["null_std"] for v in row} == {None}  # JSON's missing value
    assert pd.read_csv(tmp_path / "1" / "cka.csv")["null_std"].isna().all()  # an empty cell
    assert np.isnan(CKAResult.load(tmp_path / "1").cell("null_std")).all()  # type: ignore[arg-type]
    enough = CliRunner().invoke(
        ckascope_main, [*args, "--permutations", "19", "--out", str(tmp_path / "19")]
    )
    assert enough.exit_code == 0, enough.output
    assert "permutation" not in enough.stderr
