"""msun.splits.resolve_split: the one place a training run's split point is decided."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ckascope.distributed import DistInfo
from ckascope.errors import InputError
from ckascope.models import CHECKPOINT_FORMAT
from msun.config import TrainConfig
from msun.splits import resolve_split

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
