"""figures/fashion_study.py: a --quick smoke run end to end (on idx files written here), reuse of
everything it made, and the committed study redrawn from its data with tables that agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.ckascope.test_idx import _write_idx
from tests.scripts import FIGURES, load_figure_script

COMMITTED = FIGURES / "fashion"


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return load_figure_script("fashion_study")


def test_quick_study_runs_end_to_end_and_reuses_what_it_made(
    study: ModuleType, tmp_path: Path
) -> None:
    _write_idx(tmp_path / "fm", 128, gz=True)
    s = study.settings(True, f"fashionmnist:{tmp_path / 'fm'}")
    out, runs = tmp_path / "out", tmp_path / "runs"
    study.study(s, out, runs)
    study.redraw(out)
    acc = json.loads((out / "data" / "accuracy.json").read_text())["methods"]
    assert list(acc) == list(study.METHODS)
    assert all(a["seeds"] == 2 and a["sizes"] == list(range(4, 29, 2)) for a in acc.values())
    text = (out / "RESULTS.md").read_text()
    assert all(label in text for *_, label in study.METHODS.values())
    for name in ("accuracy_vs_size", "fig2_cross_scale_cka", "ablation_split", "heatmap_msun"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")}
    chosen = json.loads((out / "data" / "loop.json").read_text())["auto_split"]
    extra = {"layer1", "layer3", "layer4"} - {chosen}  # layer2: the main seed-0 MSUN run
    assert len(stamps) == 4 * 2 + 1 + len(extra)  # 4 methods x 2 seeds, the auto run, ablation
    study.study(s, out, runs)  # everything reused: no run trained or evaluated again
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")} == stamps


@pytest.mark.skipif(not (COMMITTED / "data").is_dir(), reason="the study's data is not committed")
def test_the_committed_study_redraws_and_its_tables_agree_with_its_data(
    study: ModuleType, tmp_path: Path
) -> None:
    copy = tmp_path / "fashion"
    shutil.copytree(COMMITTED / "data", copy / "data")
    study.redraw(copy)
    assert (copy / "RESULTS.md").read_text() == (COMMITTED / "RESULTS.md").read_text()
    saved = json.loads((copy / "data" / "accuracy.json").read_text())
    for name, agg in saved["methods"].items():
        evals = [
            json.loads((copy / "data" / "eval" / f"{name}_seed{seed}.json").read_text())
            for seed in saved["settings"]["seeds"]
        ]
        again = study.aggregate(evals)
        assert again == agg  # every number in the tables comes from the per-run evaluations
        per_size = np.array([e["top1"] for e in evals]).mean(axis=0)
        assert np.mean(per_size) == pytest.approx(agg["mean"]["mean"])
