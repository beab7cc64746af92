"""msun.splits.resolve_split: the one place a training run's split point is decided."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckascope.distributed import DistInfo
from ckascope.errors import CKAScopeWarning, InputError
from ckascope.models import CHECKPOINT_FORMAT
from ckascope.result import CKAResult
from ckascope.split import suggest_split
from msun.config import TrainConfig
from msun.splits import choose, resolve_split, split_candidates

CPU = DistInfo(0, 1, torch.device("cpu"))


def _msun_init(split_at: str, scales: list[int]) -> dict[str, Any]:
    config = {"arch": "resnet18", "split_at": split_at, "scales": scales, "num_classes": 10}
    return {"format": CHECKPOINT_FORMAT, "builder": "msun", "config": {**config, "routing": [16]}}


def test_the_published_default_for_none_and_a_given_point_as_given() -> None:
    cfg = TrainConfig(model="resnet18", scales=(16, 32))
    assert resolve_split(cfg, None, None, CPU) == ("layer2", (16, 32))
    vgg = TrainConfig(model="vgg11", split_at="features.6", scales=(16, 32))
    assert resolve_split(vgg, None, None, CPU) == ("features.6", (16, 32))


def test_an_illegal_point_is_refused_with_the_legal_ones() -> None:
    cfg = TrainConfig(model="resnet18", split_at="layer9")
    with pytest.raises(InputError, match="layer1, layer2, layer3, layer4"):
        resolve_split(cfg, None, None, CPU)


def test_other_methods_have_no_split() -> None:
    for method in ("vanilla", "mst"):
        cfg = TrainConfig(model="resnet18", method=method, scales=(16, 32))
        assert resolve_split(cfg, None, None, CPU) == (None, (16, 32))


def test_fine_tuning_an_msun_keeps_its_split_and_scales() -> None:
    cfg = TrainConfig(model="resnet18", scales=(32, 128, 224))
    init = _msun_init("layer3", [16, 32])
    assert resolve_split(cfg, init, None, CPU) == ("layer3", (16, 32))
    vanilla = {"format": CHECKPOINT_FORMAT, "builder": "torchvision", "config": {}}
    assert resolve_split(cfg, vanilla, None, CPU) == ("layer2", (32, 128, 224))


def test_auto_keeps_the_choice_of_the_run_it_resumes() -> None:
    cfg = TrainConfig(model="resnet18", split_at="auto", scales=(16, 32))
    saved = {"train_config": {**cfg.to_dict(), "split_at": "layer4"}}
    assert resolve_split(cfg, None, saved, CPU) == ("layer4", (16, 32))


def test_the_auto_analysis_has_enough_minibatches_to_judge_its_stability() -> None:
    from ckascope.calibration import FEW_BATCHES
    from msun.splits import ANALYSIS_IMAGES, analysis_batch

    for world in (1, 2, 4, 8, 16, 32, 64):
        batch = analysis_batch(world)
        assert ANALYSIS_IMAGES // batch >= max(FEW_BATCHES, world), world  # a batch per process


def _saved(
    folder: Path,
    diagonal: float,
    scales: list[int],
    calibration: dict[str, np.ndarray] | None = None,
    **settings: Any,
) -> Path:
    """A saved resnet18 analysis of its blocks whose same-layer CKA is ``diagonal`` throughout
    (with ``calibration`` arrays and more ``settings``, where given)."""
    layers = ["maxpool", *(f"layer{s}.{i}" for s in range(1, 5) for i in range(2))]
    matrix = np.full((1, len(layers), len(layers)), diagonal)
    settings = {
        "mode": "scales",
        "model": "resnet18",
        "arch": "resnet18",
        "scales": scales,
        **settings,
    }
    CKAResult(matrix, layers, layers, settings, calibration=calibration or {}).save(folder)
    return folder


def _auto(tmp_path: Path, analysis: Path) -> TrainConfig:
    """``--split-at auto --cka-from analysis`` at scales 4 16 28 (the candidates' costs are
    counted once per scales: every test here uses these)."""
    out = str(tmp_path / "run")
    return TrainConfig(
        model="resnet18", split_at="auto", cka_from=str(analysis), out=out, scales=(4, 16, 28)
    )


def test_auto_below_the_threshold_names_the_trainers_options(tmp_path: Path) -> None:
    analysis = _saved(tmp_path / "cka", 0.5, [4, 28])
    assert choose(_auto(tmp_path, analysis), None, CPU) == "layer1"
    reason = json.loads((tmp_path / "run/split-analysis/suggestion.json").read_text())["reason"]
    assert "no split point's input reaches CKA 0.8" in reason
    assert "Hint: name the split with --split-at" in reason
    assert "--cka-from DIR" in reason
    assert "--threshold" not in reason  # suggest-split's option: msun train has none
    # ckascope suggest-split keeps its own hint (the fashion study's tables quote it)
    candidates = split_candidates("resnet18", (4, 16, 28))
    own = suggest_split(CKAResult.load(analysis), candidates).reason
    assert own.endswith("Hint: a lower --threshold, or more layers in the analysis")


#: What ckascope suggest-split's notes and stability name, options msun train has not (or
#: means otherwise: its --weights is the training's, its --batch-size the training's).
SUGGEST_SPLITS_WORDS = ("Hint: --weights", "--checkpoint of", "Hint: more", "Hint: rerun")


def _replicates(shares: dict[float, int]) -> dict[str, np.ndarray]:
    """Bootstrap diagonals: ``n`` replicates whose stem (maxpool) CKA is ``v``, per ``v: n``."""
    rows = [[v] + [0.9] * 8 for v, n in shares.items() for _ in range(n)]
    return {"bootstrap_diagonal": np.array(rows)}


@pytest.mark.parametrize(
    ("calibration", "settings", "says"),
    [
        (
            None,
            {"weights": "none"},
            [
                "note: the analysed network has random weights",
                "Hint: give --cka-from an analysis of a trained network (ckascope compare "
                "--checkpoint RUN/last.pt), or leave --cka-from out",
                "this result has no bootstrap resamples. Hint: give --cka-from an analysis with "
                "bootstrap resamples (ckascope compare --bootstrap 1000",
            ],
        ),
        (
            _replicates({0.9: 50, 0.5: 50}),  # layer1 in half of them, layer2 in the others
            {"bootstrap_draws": 16},
            [
                "UNSTABLE",
                "Hint: give --cka-from an analysis of more images (ckascope compare "
                "--num-images, --repeats), or name the split with --split-at",
            ],
        ),
        (
            _replicates({0.9: 100}),
            {"bootstrap_draws": 2},
            [
                "too few to judge",
                "Hint: give --cka-from an analysis of more minibatches (ckascope compare with "
                "more --num-images or a smaller --batch-size)",
            ],
        ),
    ],
    ids=["random-weights", "unstable", "few-minibatches"],
)
def test_auto_notes_and_stability_name_the_trainers_options(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    calibration: dict[str, np.ndarray] | None,
    settings: dict[str, Any],
    says: list[str],
) -> None:
    analysis = _saved(tmp_path / "cka", 0.9, [4, 28], calibration, **settings)
    assert choose(_auto(tmp_path, analysis), None, CPU) == "layer1"
    printed = " ".join(capsys.readouterr().out.split())  # one line each, wrapped or not
    for words in says:
        assert words in printed
    recorded = json.loads((tmp_path / "run/split-analysis/suggestion.json").read_text())
    for theirs in SUGGEST_SPLITS_WORDS:
        assert theirs not in printed
        assert theirs not in " ".join(recorded["notes"])


def test_auto_notes_an_analysis_of_other_scales_than_the_runs_ends(tmp_path: Path) -> None:
    other = _auto(tmp_path, _saved(tmp_path / "16-28", 0.9, [16, 28]))
    note = r"compared scales 16 and 28, not this run's smallest and largest \(4 and 28\)"
    with pytest.warns(CKAScopeWarning, match=note) as caught:
        assert choose(other, None, CPU) == "layer1"  # used, and said
    assert "ckascope compare --scales 4 28" in str(caught[0].message)
    ends = _auto(tmp_path, _saved(tmp_path / "4-28", 0.9, [28, 4]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CKAScopeWarning)  # the run's own ends: nothing to say
        assert choose(ends, None, CPU) == "layer1"
