"""figures/fashion_study.py: the budget rule, the loop's criterion, a --quick study end to end (on
idx files written here) that resumes in pieces, and the committed study redrawn from its data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.idxfiles import write_idx
from tests.scripts import FIGURES, load_figure_script

COMMITTED = FIGURES / "fashion"


@pytest.fixture(scope="module")
def study() -> ModuleType:
    return load_figure_script("fashion_study")


def test_the_budget_is_the_first_epoch_near_the_plateau_within_its_bounds(
    study: ModuleType,
) -> None:
    curve = [70.0, 80.0, 86.0, 88.4, 89.0, 90.0, 90.5, 91.0, 91.0, 91.3]
    choice = study.choose_budget(curve, 3, 6)
    assert choice["plateau"] == pytest.approx((91.0 + 91.0 + 91.3) / 3)
    assert choice["first_within"] == 6  # 90.0 >= 91.1 - 1.5; 88.4 and 89.0 are not
    assert choice["epochs"] == 6
    assert study.choose_budget(curve, 3, 5)["epochs"] == 5  # the cap
    assert study.choose_budget([90.0, 91.0, 91.0, 91.0], 3, 6)["epochs"] == 3  # the floor
    assert study.choose_budget([90.0, 91.0, 91.0, 91.0], 1, 6)["first_within"] == 1


def test_the_loop_verdict_compares_the_gap_with_the_pooled_seed_std(study: ModuleType) -> None:
    def point(mean: float, std: float) -> dict[str, float]:
        return {"mean": mean, "std": std}

    ablation = {
        "layer1": point(90.0, 0.3),
        "layer2": point(90.2, 0.4),
        "layer3": point(90.5, 0.5),
        "layer4": point(90.1, 0.6),
    }
    loop = [{"choice": "layer1"}, {"choice": "layer2"}, {"choice": "layer2"}]
    v = study.loop_verdict(ablation, loop)
    pooled = np.sqrt(np.mean([0.09, 0.16, 0.25, 0.36]))
    assert v["suggested"] == "layer2"
    assert not v["same_on_every_seed"]
    assert v["best"] == "layer3"
    assert v["pooled_std"] == pytest.approx(pooled)
    assert v["gap_to_best"] == pytest.approx(0.3)
    assert v["right"]
    tie = study.loop_verdict(ablation, [{"choice": "layer4"}, {"choice": "layer1"}])
    assert tie["suggested"] == "layer1"  # a tie goes to the earliest split
    assert not tie["right"]  # 0.5 > 0.47


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_quick_study_runs_in_pieces_and_reuses_what_it_made(
    study: ModuleType, tmp_path: Path
) -> None:
    write_idx(tmp_path / "fm", 128, gz=True)
    s = study.settings(True, f"fashionmnist:{tmp_path / 'fm'}")
    out, runs, data = tmp_path / "out", tmp_path / "runs", tmp_path / "out" / "data"
    assert study.status(s, data, runs)[1].startswith("to do        probe_")
    study.study(s, out, runs)
    study.redraw(out)
    planned = study.study_runs(s, 1, runs)
    assert len(planned) == 6 * 2 + 3 * 2  # 6 methods and 3 more splits, 2 seeds each
    assert study.status(s, data, runs)[0] == f"{len(planned)} of {len(planned)} runs done"
    budget = json.loads((data / "budget.json").read_text())
    assert budget["epochs"] == 1
    assert len(budget["curve"]) == 2
    saved = json.loads((data / "accuracy.json").read_text())
    assert saved["settings"]["epochs"] == 1
    assert saved["runs_done"] == len(planned)
    assert all(
        a["seeds"] == 2 and a["sizes"] == list(range(4, 29, 2)) for a in saved["methods"].values()
    )
    assert {k: a["seeds"] for k, a in saved["ablation"].items()} == dict.fromkeys(study.SPLITS, 2)
    assert set(saved["recalibrated"]) == set(study.METHODS)  # every model scored both ways
    record = json.loads((data / "runs" / "mst_pbn_seed0.json").read_text())
    assert record["train_config"]["bn"] == "private"
    assert record["train_config"]["distill"] is True
    assert record["evaluation_recalibrated"]["recalibrate_bn"] == s["recalibrate_images"]
    assert record["evaluation_recalibrated"]["variant"] == "mst, private BN, BN recalibrated on 16"
    assert record["evaluation_recalibrated"]["recalibrate_batch"] == s["recalibrate_batch"]
    assert set(saved["suggested"]) == {"0", "1"}
    loop = json.loads((data / "loop.json").read_text())
    assert all(r["auto_split"] == r["choice"] for r in loop["seeds"])
    assert loop["verdict"]["suggested"] in study.SPLITS
    text = (out / "RESULTS.md").read_text()
    assert all(label in text for *_, label in study.METHODS.values())
    for name in ("budget", "accuracy_vs_size", "fig2_cross_scale_cka_rbf", "ablation_split"):
        assert (out / f"{name}.png").stat().st_size > 10_000

    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")}
    study.study(s, out, runs)  # everything reused: nothing trained, evaluated or analysed again
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")} == stamps
    # A run whose checkpoint is gone and whose record is missing trains again, alone; a run
    # with its checkpoint but no record (stopped after training) only writes its record.
    (data / "runs" / "mst_seed1.json").unlink()
    shutil.rmtree(runs / "mst_seed1")
    (data / "runs" / "ablation_layer3_seed0.json").unlink()
    # A record made before the recalibrated scores gets them, from its checkpoint.
    older = data / "runs" / "vanilla_seed0.json"
    older.write_text(json.dumps({**json.loads(older.read_text()), "evaluation_recalibrated": None}))
    assert "to do        mst_seed1" in study.status(s, data, runs)
    study.study(s, out, runs)
    again = {p: p.stat().st_mtime_ns for p in runs.rglob("last.pt")}
    assert {p for p in again if again[p] != stamps.get(p)} == {runs / "mst_seed1" / "last.pt"}
    assert (data / "runs" / "ablation_layer3_seed0.json").is_file()
    assert json.loads(older.read_text())["evaluation_recalibrated"]["recalibrate_bn"] == 16


@pytest.mark.skipif(
    not (COMMITTED / "data" / "accuracy.json").is_file(), reason="the study's data is not committed"
)
def test_the_committed_study_redraws_and_its_tables_agree_with_its_records(
    study: ModuleType, tmp_path: Path
) -> None:
    copy = tmp_path / "fashion"
    shutil.copytree(COMMITTED / "data", copy / "data")
    study.redraw(copy)
    assert (copy / "RESULTS.md").read_text() == (COMMITTED / "RESULTS.md").read_text()
    block = (copy / "README_RESULTS.md").read_text()
    assert block == (COMMITTED / "README_RESULTS.md").read_text()
    assert block in (FIGURES.parent / "README.md").read_text()  # the README shows the data
    saved = json.loads((copy / "data" / "accuracy.json").read_text())
    plan = study.plan_of(saved["settings"], saved["settings"]["epochs"])
    for name, agg in saved["methods"].items():
        evals = study.records(
            copy / "data", [plan[f"{name}_seed{s}"] for s in saved["settings"]["seeds"]]
        )
        assert study.aggregate(evals) == agg  # every number in the tables comes from the records
        per_size = np.array([e["top1"] for e in evals]).mean(axis=0)
        assert np.mean(per_size) == pytest.approx(agg["mean"]["mean"])
    for name, agg in saved.get("recalibrated", {}).items():
        planned = [plan[f"{name}_seed{s}"] for s in saved["settings"]["seeds"]]
        runs = study.recalibrated_runs(copy / "data", planned, saved["settings"])
        evals = study.records(copy / "data", runs, "evaluation_recalibrated")
        assert study.aggregate(evals) == agg
        paired = study.records(copy / "data", runs)  # as trained: the same runs
        assert study.aggregate(paired) == saved["recalibrated_as_trained"][name]
    for split, point in saved["ablation"].items():
        assert study.ablation_point(saved["settings"], copy / "data", split, plan) == point


def _agg(seeds: int, smallest: float, full: float, std: float = 0.5) -> dict[str, object]:
    return {
        "seeds": seeds,
        "smallest": {"mean": smallest, "std": std},
        "full": {"mean": full, "std": std},
    }


def test_the_rivals_criteria_are_read_as_pre_registered(study: ModuleType) -> None:
    acc = {
        "vanilla": _agg(3, 36.0, 88.0),
        "msun": _agg(3, 55.0, 86.0),
        "msun_pbn": _agg(3, 56.0, 87.5),
        "mst_pbn": _agg(3, 50.0, 87.0),
    }
    recal = {"vanilla": _agg(3, 54.8, 87.8), "mst_pbn": _agg(3, 52.0, 87.9)}
    (_, met5, why5), (_, met6, why6) = study.rival_verdict(acc, recal)
    assert not met5  # +0.2 is positive but within the larger seed std (0.5)
    assert "+0.20" in why5
    assert "vs MST + private BN +5.00" in why5
    assert met6  # vanilla - MSUN + private-BN trunk = 0.5 <= 1
    assert why6.endswith(
        "removes 1.50 of the published MSUN's +2.00-point gap (75 %; beyond the larger seed std)"
    )
    wider = {**acc, "msun_pbn": _agg(3, 56.0, 85.7)}  # gap 2.3, the published MSUN's 2.0
    (_, met6, why6) = study.rival_verdict(wider, recal)[1]
    assert not met6
    assert why6.endswith(
        "it widens the published MSUN's +2.00-point gap by 0.30 (within the larger seed std)"
    )
    above = {**acc, "msun": _agg(3, 55.0, 88.4)}
    assert study.rival_verdict(above, recal)[1][2].endswith(
        "the published MSUN is not below vanilla at full size (+0.40)"
    )
    recal["vanilla"] = _agg(3, 40.0, 87.8)
    assert study.rival_verdict(acc, recal)[0][1]  # +15 beyond any seed std
    one = {**acc, "msun": _agg(1, 55.0, 86.0, 0.0)}
    assert "one seed: its spread is not known yet" in study.rival_verdict(one, recal)[0][2]
    assert study.rival_state(one, recal, 3) == " (provisional: 1 of 3 seeds)"
    assert study.rival_state(acc, recal, 3) == ""
    assert study.rival_verdict({"vanilla": acc["vanilla"]}, {}) == []  # nothing to judge yet


def test_the_papers_criteria_name_the_spread_of_each_pair_they_compare(study: ModuleType) -> None:
    acc = {
        "vanilla": {**_agg(3, 36.0, 88.0), "mean": {"mean": 77.0, "std": 1.0}},
        "mst": {**_agg(3, 47.0, 81.0), "mean": {"mean": 79.0, "std": 0.1}},
        "msun": {**_agg(1, 55.0, 86.5, 0.0), "mean": {"mean": 79.5, "std": 0.0}},
    }
    (_, met, why), (_, met_small, _), (_, met_full, _) = study.verdict(acc, "msun")
    assert met  # 79.5 > 79.0 > 77.0
    assert "79.50 / 79.00 ± 0.10 / 77.00 ± 1.00" in why  # no std for the one-seed MSUN
    assert "MSUN - MST +0.50 (one seed: its spread is not known yet)" in why
    assert "MST - vanilla +2.00 (beyond the larger seed std)" in why  # both have 3 seeds
    assert why.endswith("; met on the means only: a gap within the seed std leaves that order open")
    assert met_small  # +19 points
    assert not met_full  # vanilla - MSUN = 1.5 > 1
    acc["msun"] = {**_agg(3, 55.0, 86.5), "mean": {"mean": 80.0, "std": 0.2}}
    (_, met, why), *_ = study.verdict(acc, "msun")
    assert met
    assert why.endswith(
        "MSUN - MST +1.00 (beyond the larger seed std), MST - vanilla +2.00 (beyond the larger seed std)"
    )


def test_what_a_later_split_buys_is_weighed_against_the_seed_noise(study: ModuleType) -> None:
    def point(mean: float, params: int, gflops: float) -> dict[str, Any]:
        return {"mean": mean, "std": 0.3, "extra_params": params, "gflops": gflops}

    ablation = {
        "layer1": point(90.0, 7_000, 0.0676),
        "layer2": point(90.2, 303_000, 0.0694),
        "layer3": point(90.5, 1_354_000, 0.0688),
        "layer4": point(90.1, 5_000_000, 0.0700),
    }
    v = study.loop_verdict(ablation, [{"choice": "layer1"}])
    lines = [x for x in study.loop_verdict_markdown(ablation, v) if x.startswith("- ")]
    assert lines == [
        "- layer2: +0.296 M parameters, +1.80 MFLOPs per image (mean over the sizes), +0.20 "
        "points of mean top-1 (within the pooled seed std)",
        "- layer3: +1.347 M parameters, +1.20 MFLOPs per image (mean over the sizes), +0.50 "
        "points of mean top-1 (beyond the pooled seed std)",
        "- layer4: +4.993 M parameters, +2.40 MFLOPs per image (mean over the sizes), +0.10 "
        "points of mean top-1 (within the pooled seed std)",
    ]
