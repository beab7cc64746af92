"""figures/make_figures.py: its committed data redraws without a model; runs are reused, never
overwritten."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from ckascope.plot import curve, heatmap
from ckascope.result import CKAResult
from msun.splits import split_candidates
from tests.scripts import FIGURES, load_figure_script


@pytest.fixture(scope="module")
def mf() -> ModuleType:
    return load_figure_script("make_figures")


@pytest.mark.parametrize(("suffix", "kernel"), [("", "linear"), ("_rbf", "rbf")])
def test_figure2_redraws_from_the_committed_results(
    mf: ModuleType, tmp_path: Path, suffix: str, kernel: str
) -> None:
    data = FIGURES / "data"
    results = [CKAResult.load(data / f"cka_{name}{suffix}") for name in mf.CKA_LABELS]
    path = mf.png(curve(results, labels=list(mf.CKA_LABELS.values())), tmp_path, "fig2")
    assert path.stat().st_size > 10_000
    for r in results:
        assert r.settings["scales"] == [16, 64]
        assert r.settings["kernel"] == kernel
        d = np.diag(r.matrix)
        assert np.all((d > 0) & (d <= 1 + 1e-9))
        assert mf.png(heatmap(r), tmp_path, "heatmap").stat().st_size > 10_000


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_ablation_redraws_from_its_committed_json(mf: ModuleType, tmp_path: Path) -> None:
    saved = json.loads((FIGURES / "data" / "ablation_split.json").read_text())
    rows = saved["rows"]
    assert [r["split_at"] for r in rows] == list(mf.SPLITS)
    costs = {
        c.name: c.extra_params for c in split_candidates("resnet18", saved["settings"]["scales"])
    }
    assert [r["extra_params"] for r in rows] == [costs[s] for s in mf.SPLITS]
    for r in rows:
        assert r["mean_top1"] == pytest.approx(np.mean(r["top1"]))
    assert saved["si"] == mf.RUNS[mf.ABLATION_RUN][2]
    figure = mf.ablation_figure(rows, saved["suggest_split"])
    assert mf.png(figure, tmp_path, "ablation").stat().st_size > 10_000


def test_figure4_redraws_from_its_committed_json(mf: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    saved = FIGURES / "data" / "fig4_accuracy.json"
    (tmp_path / "data" / saved.name).write_text(saved.read_text())
    models = json.loads(saved.read_text())["models"]
    assert [m["checkpoint"] for m in models] == list(mf.RUNS)
    for m in models:  # the legend's mean is the curve's
        assert m["mean_top1"] == pytest.approx(np.mean(m["top1"]))
    mf.draw_figure4(tmp_path)
    assert (tmp_path / "fig4_accuracy.png").stat().st_size > 10_000


def _tiny() -> dict[str, Any]:
    return {
        "image_size": 16,
        "scales": (8, 16),
        "num_train": 8,
        "num_val": 8,
        "epochs": 1,
        "batch_size": 8,
        "eval_sizes": "8:16:8",
    }


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_run_reuses_a_finished_run_and_refuses_other_settings(
    mf: ModuleType, tmp_path: Path
) -> None:
    folder = tmp_path / "msun"
    last = mf.run(mf.train_config(_tiny(), "msun", folder, "layer2"))
    stamp = last.stat().st_mtime_ns
    assert mf.run(mf.train_config(_tiny(), "msun", folder, "layer2")) == last
    assert last.stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(SystemExit, match=r"other settings.*split_at"):
        mf.run(mf.train_config(_tiny(), "msun", folder, "layer3"))
    assert last.stat().st_mtime_ns == stamp


def test_outliers_diagnostic_finds_a_dominating_image() -> None:
    outliers = load_figure_script("outliers")
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(200, 16, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    a = b @ q  # a rotation of b: CKA 1
    a[0] *= 100.0  # one image far out on one side only
    row = outliers.layer_row(a, b, drop=0.02)
    assert row["linear"] < 0.5
    assert row["linear_without_outliers"] == pytest.approx(1.0)
    assert row["images_dropped"] >= 1
    assert row["max_norm_over_median_small"] > 50
    assert row["max_norm_over_median_large"] < 5
