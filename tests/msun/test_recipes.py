"""The authors' recipe where it differs from a literal reading of the paper (docs/msun.md)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import msun
from ckascope.distributed import DistInfo
from ckascope.errors import InputError
from msun import build_msun, save_checkpoint
from msun.backbones import backbone_for, meta_model
from msun.cli import main
from msun.config import TrainConfig, merge, paper_sizes, parse_sizes, resolve, sizes_text
from msun.recipes import list_recipes, recipe_for
from msun.splits import resolve_split
from tests import tinyrun

ONE_STEP = [*tinyrun.TRAIN, "--steps-per-epoch", "1", "--lr", "0.5"]


def _weights(out: Path, *extra: str) -> dict[str, torch.Tensor]:
    result = CliRunner().invoke(main, ["train", *ONE_STEP, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    state: dict[str, torch.Tensor] = torch.load(out / "last.pt", weights_only=False)["state_dict"]
    return state


def _config(out: Path) -> dict[str, object]:
    config: dict[str, object] = yaml.safe_load((out / "config.yaml").read_text())
    return config


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_vanilla_and_mst_are_not_clipped_by_default_msun_is(tmp_path: Path) -> None:
    default = _weights(tmp_path / "default", "--method", "vanilla")
    unclipped = _weights(tmp_path / "huge", "--method", "vanilla", "--grad-clip", "1e9")
    clipped = _weights(tmp_path / "clipped", "--method", "vanilla", "--grad-clip", "1.0")
    for name, tensor in default.items():
        torch.testing.assert_close(tensor, unclipped[name], rtol=0, atol=0)
    assert any(not torch.equal(t, clipped[n]) for n, t in default.items())
    assert _config(tmp_path / "default")["grad_clip"] == 0.0
    _weights(tmp_path / "msun", "--method", "msun")
    assert _config(tmp_path / "msun")["grad_clip"] == 1.0
    _weights(tmp_path / "mst", "--method", "mst")
    assert _config(tmp_path / "mst")["grad_clip"] == 0.0


# The published recipe (docs/msun.md), stated here apart from msun.recipes: the ResNet family
# trains at 0.5 per 1024 images with tau 0.01, the other backbones at 0.1 per 256 with tau
# 0.001; 90 epochs, MobileNetV2 300; the split points msun.backbones' adapters gave as their
# default before msun.recipes held them (VGG: after the third max-pool).
RESNET_FAMILY = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
PUBLISHED_SPLITS = {
    **dict.fromkeys(RESNET_FAMILY, "layer2"),
    **dict.fromkeys(("densenet121", "densenet161", "densenet169", "densenet201"), "denseblock2"),
    "vgg11": "features.11",
    "vgg11_bn": "features.15",
    "vgg13": "features.15",
    "vgg13_bn": "features.21",
    "vgg16": "features.17",
    "vgg16_bn": "features.24",
    "vgg19": "features.19",
    "vgg19_bn": "features.27",
    "mobilenet_v2": "features.10",
}


def _published_lr(arch: str, batch_size: int) -> float:
    return (0.5 / 1024 if arch in RESNET_FAMILY else 0.1 / 256) * batch_size


def test_every_supported_architecture_has_one_recipe() -> None:
    assert [r.arch for r in list_recipes()] == list(msun.supported_archs())
    assert set(PUBLISHED_SPLITS) == set(msun.supported_archs())  # this test states them all


@pytest.mark.parametrize("arch", msun.supported_archs())
def test_each_recipe_is_the_published_one(arch: str) -> None:
    recipe = recipe_for(arch)
    resnet = arch in RESNET_FAMILY
    assert recipe.arch == arch
    assert recipe.family == backbone_for(arch).family
    assert (recipe.family == "resnet") == resnet
    assert (recipe.lr, recipe.lr_batch) == ((0.5, 1024) if resnet else (0.1, 256))
    assert recipe.lr_at(512) == _published_lr(arch, 512)  # bit for bit
    assert recipe.epochs == (300 if arch == "mobilenet_v2" else 90)
    assert recipe.si_threshold == (0.01 if resnet else 0.001)
    assert recipe.default_split == PUBLISHED_SPLITS[arch]


@pytest.mark.parametrize("arch", [a for a in msun.supported_archs() if a.startswith("vgg")])
def test_vgg_splits_after_its_third_max_pool(arch: str) -> None:
    features = meta_model(arch).get_submodule("features")
    pools = [i for i, m in enumerate(features) if isinstance(m, torch.nn.MaxPool2d)]
    assert recipe_for(arch).default_split == f"features.{pools[2] + 1}"


@pytest.mark.parametrize("arch", msun.supported_archs())
def test_the_run_takes_the_architectures_recipe(arch: str) -> None:
    recipe = recipe_for(arch)
    cfg = resolve(TrainConfig(model=arch, batch_size=512), num_classes=10)
    assert (cfg.epochs, cfg.lr, cfg.si_threshold) == (
        recipe.epochs,
        _published_lr(arch, 512),
        recipe.si_threshold,
    )
    assert resolve(TrainConfig(model=arch, method="vanilla"), num_classes=10).si_threshold is None
    cpu = DistInfo(0, 1, torch.device("cpu"))
    split, _ = resolve_split(TrainConfig(model=arch, scales=(16, 32)), None, None, cpu)
    assert split == recipe.default_split


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "vgg11", "mobilenet_v2"])
def test_an_msun_built_without_a_split_takes_the_recipes(arch: str) -> None:
    with torch.device("meta"):
        model = build_msun(arch, scales=(16, 32), num_classes=10)
    assert model.split_at == recipe_for(arch).default_split


def test_given_values_win_over_the_recipe() -> None:
    given = TrainConfig(model="mobilenet_v2", epochs=3, lr=0.2, si_threshold=0.5)
    cfg = resolve(given, num_classes=10)
    assert (cfg.epochs, cfg.lr, cfg.si_threshold) == (3, 0.2, 0.5)


def test_an_unknown_architecture_has_no_recipe_and_gets_a_hint() -> None:
    with pytest.raises(InputError, match=r"Hint: did you mean .*resnet50"):
        recipe_for("resnet5")
    with pytest.raises(InputError, match="supported"):
        resolve(TrainConfig(model="alexnet"), num_classes=10)


def test_a_recipe_is_read_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe_for("resnet50").epochs = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("arch", "tau"),
    [
        ("resnet18", 0.01),
        ("resnet50", 0.01),
        ("resnext50_32x4d", 0.01),
        ("wide_resnet50_2", 0.01),
        ("densenet121", 0.001),
        ("vgg16_bn", 0.001),
        ("mobilenet_v2", 0.001),
    ],
)
def test_si_threshold_is_the_authors_per_family(arch: str, tau: float) -> None:
    assert msun.default_si_threshold(arch) == tau


def test_paper_sizes_are_the_13_sizes_scaled_to_the_training_size() -> None:
    assert paper_sizes(224) == list(range(32, 225, 16))
    assert paper_sizes(28) == list(range(4, 29, 2))
    assert paper_sizes(56) == list(range(8, 57, 4))
    assert sizes_text(paper_sizes(224)) == "32:224:16"
    for size in (32, 64, 96, 100):
        sizes = paper_sizes(size)
        assert len(sizes) == 13
        assert sizes[0] == round(size / 7)
        assert sizes[-1] == size
        assert parse_sizes(sizes_text(sizes)) == sizes
    assert len(paper_sizes(7)) < 13  # sizes that round alike appear once


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_validation_defaults_to_sizes_scaled_to_the_image_size(tmp_path: Path) -> None:
    args = [a for a in tinyrun.TRAIN if a not in ("--eval-sizes", "16,32")]
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert parse_sizes(str(_config(out)["eval_sizes"])) == paper_sizes(32)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {f"val_top1_{s}" for s in paper_sizes(32)} <= row.keys()


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_without_run_sizes_uses_the_scaled_paper_sizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(build_msun("resnet18", scales=(8, 28), num_classes=10), tmp_path / "m.pt")
    out = tmp_path / "eval"
    args = ["eval", str(tmp_path / "m.pt"), "--image-size", "28", "--num-val", "4"]
    result = CliRunner().invoke(main, [*args, "--paths", "routed", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "eval.json").read_text())[0]["sizes"] == list(range(4, 29, 2))
    assert "path 1" in result.output  # the per-path table --help promises
    assert re.search(r"\d+\.\d\d\*", result.output)  # the routed path's cell
    assert "validation" not in result.output
    assert "eval m (13 sizes): 1/1 (" in result.output  # progress without a terminal


def test_amp_auto_is_stored_resolved_so_a_device_change_cannot_slip_in(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _weights(out, "--method", "vanilla")
    assert _config(out)["amp"] == "none"  # auto on this CPU
    result = CliRunner().invoke(
        main,
        ["train", *ONE_STEP, "--method", "vanilla", "--out", str(out), "--resume", "--amp", "bf16"],
    )
    assert result.exit_code == 2
    assert "amp: 'none' -> 'bf16'" in result.output


def test_runs_made_under_the_older_defaults_still_resume(tmp_path: Path) -> None:
    from msun.runstate import check_resume

    cfg = TrainConfig(method="msun", amp="none", grad_clip=0.0, si_threshold=0.01, out="r")
    saved = {**cfg.to_dict(), "amp": "auto"}  # amp was stored unresolved before
    check_resume({"train_config": saved}, cfg)
    saved.update(grad_clip=1.0, si_threshold=0.001)
    with pytest.raises(Exception, match=r"older defaults: --grad-clip 1 --si-threshold 0\.001"):
        check_resume({"train_config": saved}, cfg)


def test_the_warm_up_is_the_recipes_share_of_a_shorter_run() -> None:
    def warmup(**options: object) -> float | None:
        return resolve(TrainConfig(**options), num_classes=10).warmup_epochs  # type: ignore[arg-type]

    assert warmup(epochs=90) == 5.0
    assert warmup(epochs=300) == 5.0  # the cap: the recipe's 5 epochs
    assert warmup(epochs=18) == pytest.approx(1.0)
    assert warmup(epochs=1) == pytest.approx(5 / 90)
    assert warmup(epochs=1, warmup_epochs=0.0) == 0.0  # given: as given


def test_a_run_made_with_the_old_five_epoch_warm_up_names_the_flag_to_resume_it() -> None:
    from msun.runstate import check_resume

    cfg = resolve(TrainConfig(method="vanilla", epochs=2, out="r"), num_classes=10)
    saved = {**cfg.to_dict(), "warmup_epochs": 5.0}
    with pytest.raises(Exception, match=r"older defaults: --warmup-epochs 5"):
        check_resume({"train_config": saved}, cfg)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [(224, (32, 128, 224)), (28, (4, 16, 28)), (64, (9, 37, 64)), (32, (5, 18, 32))],
)
def test_default_scales_are_the_papers_at_the_image_size(
    image_size: int, expected: tuple[int, ...]
) -> None:
    assert TrainConfig(image_size=image_size).scales == expected
    assert merge({"image_size": image_size}).scales == expected  # a config file or flags
    assert TrainConfig(image_size=image_size, scales=(8, 16)).scales == (8, 16)  # given: kept


def test_default_validation_is_a_tenth_of_the_training_it_follows() -> None:
    from msun.data import MIN_VALIDATION, default_num_val

    def images(steps: int, available: int = 10_000, **options: object) -> int:
        cfg = resolve(TrainConfig(**options), num_classes=10)  # type: ignore[arg-type]
        return default_num_val(cfg, steps, available)

    common = {"image_size": 28, "scales": (4, 16, 28), "batch_size": 64, "epochs": 6}
    # msun: 3 x 937 steps x 64 images x 3 paths, a tenth of it over 13 sizes x 3 paths
    assert images(937, method="msun", **common) == int(0.1 * 3 * 937 * 64 * 3 / (13 * 3))
    assert images(937, method="vanilla", **common) == int(0.1 * 3 * 937 * 64 / 13)
    assert images(937, method="mst", **common) == int(0.1 * 3 * 937 * 64 * 3 / 13)
    assert images(937, method="msun", eval_every=3, **common) == int(0.1 * 3 * 937 * 64 * 9 / 39)
    assert images(5, method="msun", **common) == MIN_VALIDATION  # a tiny run: the floor
    assert images(5, available=100, method="msun", **common) == 100  # never more than there is
    assert images(10**6, available=10_000, method="msun", **common) == 10_000


def test_the_learning_rate_is_stepped_every_optimiser_step() -> None:
    """docs/msun.md: warm-up over the first 5/90 of the run, cosine to 1 % of the peak, updated
    after every step (not once per epoch); metrics' lr, read after an epoch's last step, is the
    floor at the end of the run."""
    from msun.train import make_scheduler

    cfg = resolve(TrainConfig(epochs=18, lr=1.0), num_classes=10)  # warm-up: 1 epoch
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, cfg, steps=4)
    rates = [scheduler.get_last_lr()[0]]
    for _ in range(18 * 4):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[:5] == pytest.approx([0.01, 0.2575, 0.505, 0.7525, 1.0])  # within epoch 1
    assert all(a > b for a, b in itertools.pairwise(rates[4:]))  # every step lower
    assert rates[-1] == pytest.approx(0.01)  # after the last step: the floor


def test_the_num_val_help_states_that_rule() -> None:
    from msun.data import MIN_VALIDATION, SYNTHETIC_VAL, VALIDATION_SHARE

    [field] = [f for f in dataclasses.fields(TrainConfig) if f.name == "num_val"]
    shown = field.metadata["help"]
    assert VALIDATION_SHARE == 0.1
    assert "a tenth of the training it follows" in shown
    assert f"at least {MIN_VALIDATION}" in shown
    assert f"at most the validation set ({SYNTHETIC_VAL} synthetic)" in shown
    assert "[all" not in shown  # it was never all of them


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_run_without_num_val_validates_its_share_and_records_it(tmp_path: Path) -> None:
    i = tinyrun.TRAIN.index("--num-val")
    args = tinyrun.TRAIN[:i] + tinyrun.TRAIN[i + 2 :]
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", *args, "--steps-per-epoch", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _config(out)["num_val"] == 256  # one step of 8: the floor
    assert "warm-up spans" not in result.output  # 5/90 of the 1-epoch run


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_long_run_says_how_long_at_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import msun.train

    monkeypatch.setattr(msun.train, "LONG_RUN", 0.0)  # every run counts as long
    monkeypatch.setattr(msun.train, "PACE_STEPS", 1)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", *ONE_STEP, "--steps-per-epoch", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"this run needs about [\d.]+ h more on cpu \(2 steps left", result.output)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_run_without_scales_trains_the_papers_scales_at_its_image_size(tmp_path: Path) -> None:
    i = tinyrun.TRAIN.index("--scales")
    args = tinyrun.TRAIN[:i] + tinyrun.TRAIN[i + 3 :]  # the tiny run at 32 px, no --scales
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", *args, "--steps-per-epoch", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _config(out)["scales"] == [5, 18, 32]  # 32 128 224 at 32 px
    assert "scales [5, 18, 32]" in result.output
