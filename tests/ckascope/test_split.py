from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from ckascope.calibration import FEW_BATCHES
from ckascope.cli import main
from ckascope.errors import InputError
from ckascope.result import CKAResult
from ckascope.split import SplitCandidate, position, suggest_split
from ckascope.vocab import DEFAULT_THRESHOLD
from msun.cli import main as msun_main
from tests import tinyrun
from tests.refusals import assert_refused

# docs/msun.md: ResNet-50, stem and its 16 bottlenecks, 32 vs 224 px.
PAPER = [
    0.53,
    0.85,
    0.86,
    0.86,
    0.90,
    0.84,
    0.83,
    0.84,
    0.82,
    0.80,
    0.77,
    0.78,
    0.77,
    0.77,
    0.71,
    0.65,
    0.39,
]
R50_LAYERS = ["maxpool"] + [
    f"layer{s}.{i}" for s, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for i in range(n)
]
R50_SPLITS = ["layer1", "layer2", "layer3", "layer4"]


def _result(
    diag: list[float], layers: list[str], mode: str = "scales", repeats: int = 1
) -> CKAResult:
    mats = np.stack([np.diag(diag)] * repeats)
    return CKAResult(mats, layers, layers, {"mode": mode, "model": "resnet50", "scales": [32, 224]})


def test_the_papers_resnet50_curve_picks_layer2() -> None:
    s = suggest_split(_result(PAPER, R50_LAYERS), R50_SPLITS)
    assert s.choice == "layer2"
    assert s.threshold == DEFAULT_THRESHOLD
    rows = {r.candidate.name: r for r in s.rows}
    assert rows["layer1"].input_layer == "maxpool"
    assert rows["layer1"].input_cka == 0.53
    assert rows["layer2"].input_layer == "layer1.2"
    assert rows["layer2"].input_cka == 0.86
    assert rows["layer3"].input_layer == "layer2.3"
    assert rows["layer4"].input_layer == "layer3.5"
    assert rows["layer4"].min_subnet_cka == 0.53
    assert rows["layer4"].min_subnet_layer == "maxpool"
    assert "layer1.2" in s.reason
    assert "0.860" in s.reason


@pytest.mark.parametrize(
    ("threshold", "choice"), [(0.5, "layer1"), (0.86, "layer2"), (0.861, "layer2"), (0.0, "layer1")]
)
def test_threshold_moves_the_choice(threshold: float, choice: str) -> None:
    assert (
        suggest_split(_result(PAPER, R50_LAYERS), R50_SPLITS, threshold=threshold).choice == choice
    )


def test_all_below_picks_the_most_consistent_input_earliest_on_ties() -> None:
    diag = [0.2, 0.5, 0.5, 0.6, 0.3, 0.3, 0.3, 0.6, 0.1, 0.1, 0.1, 0.1, 0.1, 0.6, 0.1, 0.1, 0.1]
    s = suggest_split(_result(diag, R50_LAYERS), R50_SPLITS, threshold=0.9)
    assert s.choice == "layer2"  # inputs: 0.2, 0.6, 0.6, 0.6 -> the first of the tie
    assert "no split point's input reaches" in s.reason


def test_all_above_picks_the_earliest() -> None:
    s = suggest_split(_result([0.95] * 17, R50_LAYERS), R50_SPLITS)
    assert s.choice == "layer1"
    assert "earliest" in s.reason


def test_ties_at_the_threshold_count_as_consistent() -> None:
    assert suggest_split(_result(PAPER, R50_LAYERS), R50_SPLITS, threshold=0.86).choice == "layer2"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-0.2, 1.0), min_size=17, max_size=17), st.floats(0.0, 1.0))
def test_choice_is_always_a_legal_split_point(diag: list[float], threshold: float) -> None:
    assert (
        suggest_split(_result(diag, R50_LAYERS), R50_SPLITS, threshold=threshold).choice
        in R50_SPLITS
    )


def test_nan_layers_never_count_as_consistent() -> None:
    diag = list(PAPER)
    diag[3] = float("nan")  # layer1.2, the input of layer2
    s = suggest_split(_result(diag, R50_LAYERS), R50_SPLITS)
    assert s.choice == "layer3"


def test_placement_of_split_points_in_other_families() -> None:
    vgg = [
        "features.2",
        "features.5",
        "features.9",
        "features.12",
        "features.16",
        "features.19",
        "features.22",
        "features.26",
    ]
    assert position(vgg, "features.24") == 7
    assert position(vgg, "features.30") == len(vgg)
    dense = [
        "features.pool0",
        "features.denseblock1",
        "features.transition1",
        "features.denseblock2",
    ]
    assert position(dense, "features.denseblock2") == 3
    assert position(["layer1.0#0", "layer2.0#0"], "layer2") == 1
    assert position(dense, "layer3") is None
    cand = [SplitCandidate("denseblock2", "features.denseblock2", 123, 4.5e9)]
    s = suggest_split(_result([0.5, 0.9, 0.95, 0.7], dense), cand)
    assert s.choice == "denseblock2"
    assert s.rows[0].input_layer == "features.transition1"
    assert s.to_dict()["candidates"][0]["extra_params"] == 123


def test_bad_input() -> None:
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        suggest_split(_result(PAPER, R50_LAYERS), R50_SPLITS, threshold=1.5)
    with pytest.raises(InputError, match=r"do not show the trunk input of features\.24"):
        suggest_split(_result(PAPER, R50_LAYERS), ["features.24", "denseblock2"])
    with pytest.raises(InputError, match="no split points"):
        suggest_split(_result(PAPER, R50_LAYERS), [])
    with pytest.raises(InputError, match="no same-layer"):
        suggest_split(_result(PAPER, R50_LAYERS, mode="models"), R50_SPLITS)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_cli_from_saved_result_table_and_json(tmp_path: Path) -> None:
    folder = _result(PAPER, R50_LAYERS, repeats=2).save(tmp_path / "r50")
    runner = CliRunner()
    table = runner.invoke(
        main, ["suggest-split", "--from", str(folder), "--split-points", ",".join(R50_SPLITS)]
    )
    assert table.exit_code == 0, table.output
    assert "--split-at layer2" in table.stdout
    out = runner.invoke(main, ["suggest-split", "--from", str(folder), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["choice"] == "layer2"
    assert [c["name"] for c in data["candidates"]] == R50_SPLITS
    assert data["candidates"][1]["extra_params"] == 438400  # msun's count for resnet50 at layer2


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_cli_prices_the_candidates_for_the_results_own_scales(tmp_path: Path) -> None:
    from msun.splits import msun_scales, split_candidates

    r18 = ["maxpool"] + [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    for scales in ([32, 224], [4, 28]):
        result = CKAResult(
            np.diag(np.linspace(0.9, 0.1, 9))[None],
            r18,
            r18,
            {"mode": "scales", "model": "resnet18", "scales": scales},
        )
        folder = result.save(tmp_path / f"r18-{scales[0]}")
        out = CliRunner().invoke(main, ["suggest-split", "--from", str(folder), "--json"])
        assert out.exit_code == 0, out.output
        priced = {c["name"]: c["macs"] for c in json.loads(out.stdout)["candidates"]}
        expected = split_candidates("resnet18", msun_scales(*scales))
        assert priced == {c.name: c.macs for c in expected}
    assert msun_scales(4, 28) == (4, 16, 28)
    assert msun_scales(32, 224) == (32, 128, 224)


@pytest.mark.parametrize(
    ("mode", "args", "needle"),
    [
        ("models", [], "no same-layer"),
        ("scales", ["--threshold", "1.5"], "'--threshold'"),
        ("scales", ["--split-points", "features.24"], "not a legal split point of resnet50"),
    ],
)
def test_cli_bad_input(tmp_path: Path, mode: str, args: list[str], needle: str) -> None:
    folder = _result(PAPER, R50_LAYERS, mode=mode).save(tmp_path / "r")
    result = CliRunner().invoke(main, ["suggest-split", "--from", str(folder), *args])
    assert result.exit_code == 2
    assert needle in result.stderr


# resnet18: stem and its 8 basic blocks; an input CKA that falls with depth
R18_LAYERS = ["maxpool"] + [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
R18_DIAG = [0.97, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]


def _r18(tmp_path: Path, name: str = "r18", **settings: object) -> Path:
    """A saved cross-scale result of resnet18 (16 vs 32 px), settings as given."""
    base = {"mode": "scales", "model": "resnet18", "arch": "resnet18", "scales": [16, 32]}
    result = CKAResult(np.diag(R18_DIAG)[None], R18_LAYERS, R18_LAYERS, {**base, **settings})
    return result.save(tmp_path / name)


def _split_json(*args: str) -> Any:
    out = CliRunner().invoke(main, ["suggest-split", *args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_given_points_are_taken_in_forward_order() -> None:
    s = suggest_split(_result(PAPER, R50_LAYERS), ["layer4", "layer2", "layer1"], threshold=0.5)
    assert s.choice == "layer1"  # the earliest passing one, not the first typed
    assert [r.candidate.name for r in s.rows] == ["layer1", "layer2", "layer4"]
    assert "earliest" in s.reason


def test_split_points_whose_input_was_not_analysed_are_refused_not_judged() -> None:
    """Layers "layer3.*,layer4*": nothing before layer3 was measured, so nothing is claimed."""
    late = [i for i, name in enumerate(R50_LAYERS) if name.startswith(("layer3", "layer4"))]
    result = _result([PAPER[i] for i in late], [R50_LAYERS[i] for i in late])
    with pytest.raises(InputError, match="trunk input of layer1, layer2, layer3:") as refused:
        suggest_split(result, R50_SPLITS)
    assert "--split-points layer4)" in str(refused.value)  # what can be judged
    assert "default --layers" in str(refused.value)
    only = suggest_split(result, ["layer4"])
    assert only.choice == "layer4"
    assert only.rows[0].input_layer == "layer3.5"


def test_a_stage_with_no_analysed_layer_leaves_the_next_split_point_unmeasured() -> None:
    kept = [i for i, name in enumerate(R50_LAYERS) if not name.startswith("layer2")]
    result = _result([PAPER[i] for i in kept], [R50_LAYERS[i] for i in kept])
    with pytest.raises(InputError, match="trunk input of layer3:") as refused:
        suggest_split(result, R50_SPLITS)  # layer3's input is layer2's output: not analysed
    assert "--split-points layer1,layer2,layer4)" in str(refused.value)
    judged = suggest_split(result, ["layer1", "layer2", "layer4"])  # layer2's input: layer1's
    assert [r.input_layer for r in judged.rows] == ["maxpool", "layer1.2", "layer3.5"]


def test_a_split_point_whose_own_stage_is_not_analysed_follows_the_stages_before_it() -> None:
    """Layers "layer3.*": layer4's input is layer3's output, measured although layer4 is not."""
    layers = ["layer3.0", "layer3.1", "fc"]
    assert position(layers, "layer4") == 2  # after layer3.1: fc's place is unknown by name
    result = _result([0.7, 0.9, 0.95], layers)
    with pytest.raises(InputError, match="trunk input of layer3:"):
        suggest_split(result, ["layer3", "layer4"])  # layer3's input, layer2's output: not here
    only = suggest_split(result, ["layer4"])
    assert (only.choice, only.rows[0].input_layer) == ("layer4", "layer3.1")
    assert position(["features.3.conv", "features.5.conv"], "features.4") == 1
    assert position(["features.denseblock1"], "features.transition1") is None  # other names


@pytest.mark.parametrize(
    ("draws", "stable", "words"),
    [
        (2, None, "only 2 minibatches: too few to judge"),
        (FEW_BATCHES - 1, None, f"only {FEW_BATCHES - 1} minibatches"),
        (FEW_BATCHES, True, "(stable: at least 80 % agree)"),
        (None, True, "(stable: at least 80 % agree)"),  # a result older than the record
    ],
)
def test_a_bootstrap_over_few_minibatches_is_too_coarse_to_call_stable(
    draws: int | None, stable: bool | None, words: str
) -> None:
    result = _result(PAPER, R50_LAYERS)
    result.calibration["bootstrap_diagonal"] = np.tile(PAPER, (100, 1))
    result.settings["bootstrap_draws"] = draws
    s = suggest_split(result, R50_SPLITS)
    assert s.stable is stable
    assert words in s.stability_text()
    assert s.to_dict()["minibatches"] == draws
    if stable is None:
        assert "stable:" not in s.stability_text()
        assert "Hint: more --num-images or a smaller --batch-size" in s.stability_text()


def test_one_minibatch_names_the_real_fix_not_the_bootstrap_flag() -> None:
    result = _result(PAPER, R50_LAYERS)
    result.settings.update(bootstrap=100, bootstrap_draws=0)  # one batch: nothing resampled
    text = suggest_split(result, R50_SPLITS).stability_text()
    assert text.startswith("stability unknown: the bootstrap had fewer than 2 minibatches")
    assert "--batch-size" in text
    assert "--bootstrap" not in text


def test_the_docs_state_the_coarse_bootstrap_bound_of_the_code() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "calibration.md").read_text()
    assert f"fewer than {FEW_BATCHES} minibatches" in " ".join(docs.split())


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_cli_given_points_are_ordered_checked_and_priced_as_the_family_prices_them(
    tmp_path: Path,
) -> None:
    folder = _r18(tmp_path)
    family = _split_json("--from", str(folder))
    given = _split_json("--from", str(folder), "--split-points", "layer3,layer1")
    assert given["choice"] == "layer1"  # layer1's input passes: depth order, not typed order
    rows = given["candidates"]
    assert [c["name"] for c in rows] == ["layer1", "layer3"]
    priced = {c["name"]: (c["extra_params"], c["macs"]) for c in family["candidates"]}
    assert {c["name"]: (c["extra_params"], c["macs"]) for c in rows} == {
        k: priced[k] for k in ("layer1", "layer3")
    }
    assert all(c["extra_params"] for c in rows)
    line = assert_refused(
        main,
        ["suggest-split", "--from", str(folder), "--split-points", "layer2,layerX"],
        "layerX",
        tmp_path,
    )
    assert "legal: layer1, layer2, layer3, layer4" in line
    twice = ["suggest-split", "--from", str(folder), "--split-points", "layer2,layer2"]
    assert_refused(main, twice, "layer2 twice", tmp_path)


def test_cli_given_points_of_an_unknown_family_follow_the_analysed_layers(
    tmp_path: Path,
) -> None:
    layers = ["stem", "block1", "block2", "block3"]
    settings = {"mode": "scales", "model": "mynet", "arch": "mynet", "scales": [16, 32]}
    folder = CKAResult(np.diag([0.5, 0.9, 0.6, 0.95])[None], layers, layers, settings).save(
        tmp_path / "mynet"
    )
    data = _split_json("--from", str(folder), "--split-points", "block3,block2")
    assert [c["name"] for c in data["candidates"]] == ["block2", "block3"]
    assert data["choice"] == "block2"
    assert [c["extra_params"] for c in data["candidates"]] == [None, None]
    argv = ["suggest-split", "--from", str(folder), "--split-points", "block2,nope"]
    assert_refused(main, argv, "nope: cannot be placed among the analysed layers", tmp_path)


def test_cli_a_two_model_result_is_refused_for_having_no_diagonal(tmp_path: Path) -> None:
    folder = _r18(tmp_path, mode="models", scales=[32, 32], model_b="resnet34")
    line = assert_refused(
        main, ["suggest-split", "--from", str(folder)], "compares two models", tmp_path
    )
    assert "no same-layer diagonal" in line
    assert "bad scales" not in line
    # the command line's way, and where its numbers are: not Python's ".matrix" alone
    assert "Hint: compare one model at two scales (ckascope compare --scales A B)" in line
    assert "in its cka.csv (CKAResult.matrix in Python)" in line


def _reason(*args: str) -> str:
    return str(_split_json(*args)["reason"])


def test_cli_below_the_threshold_more_layers_are_suggested_only_where_they_would_help(
    tmp_path: Path,
) -> None:
    every = _reason("--from", str(_r18(tmp_path)), "--threshold", "0.99")  # blocks: every input
    assert every.endswith("Hint: a lower --threshold")
    late = ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    result = CKAResult(
        np.diag([0.7, 0.6, 0.5, 0.4])[None],
        late,
        late,
        {"mode": "scales", "model": "resnet18", "arch": "resnet18", "scales": [16, 32]},
    )
    few = _reason("--from", str(result.save(tmp_path / "late")), "--split-points", "layer4")
    assert few.endswith(
        "Hint: a lower --threshold, or an analysis with the default --layers (blocks), to weigh "
        "layer1, layer2, layer3 too"
    )


def test_cli_a_multi_path_model_is_refused_in_a_whole_sentence(tmp_path: Path) -> None:
    import msun

    torch.manual_seed(0)
    msun.save_checkpoint(msun.build_msun("resnet18", scales=(16, 32)), tmp_path / "m.pt")
    argv = ["suggest-split", "--checkpoint", str(tmp_path / "m.pt"), "--scales", "16", "32"]
    line = assert_refused(main, argv, "chosen on a single-path network", tmp_path)
    assert line.startswith(f"Error: {tmp_path / 'm.pt'} holds a multi-path model (each scale")
    saved = _r18(tmp_path, paths=[0, 1])
    line = assert_refused(main, ["suggest-split", "--from", str(saved)], "multi-path", tmp_path)
    assert line.startswith("Error: this result is of a multi-path model (each scale routed")


def test_cli_a_checkpoint_or_a_results_file_as_from_gets_the_command_that_fits(
    tmp_path: Path,
) -> None:
    import torch

    run = tmp_path / "runs" / "van"
    run.mkdir(parents=True)
    torch.save({"state_dict": {}}, run / "last.pt")
    line = assert_refused(
        main, ["suggest-split", "--from", str(run / "last.pt")], "checkpoint", tmp_path
    )
    assert f"Hint: ckascope suggest-split --checkpoint {run / 'last.pt'}" in line
    assert "compare --out" not in line
    folder = _r18(tmp_path)
    argv = ["suggest-split", "--from", str(folder / "result.json")]
    assert_refused(main, argv, f"Hint: --from {folder}", tmp_path)
    train = ["train", *tinyrun.TRAIN, "--out", str(tmp_path / "out"), "--split-at", "auto"]
    line = assert_refused(
        msun_main, [*train, "--cka-from", str(run / "last.pt")], "--cka-from", tmp_path
    )
    assert "is a model checkpoint" in line
    assert f"ckascope compare --checkpoint {run / 'last.pt'} --out DIR, then --cka-from DIR" in line


def test_cli_options_of_a_new_comparison_are_refused_next_to_from(tmp_path: Path) -> None:
    folder = _r18(tmp_path)
    argv = ["suggest-split", "--from", str(folder), "--bootstrap", "500", "--model", "resnet50"]
    line = assert_refused(main, [*argv, "--out", str(tmp_path / "x")], "do not apply", tmp_path)
    assert "--model, --bootstrap, --out" in line
    same = ["suggest-split", "--from", str(folder), "--repeats", "1"]  # the default, but typed
    assert_refused(main, same, "--repeats sets up a new comparison", tmp_path)


def test_cli_an_option_its_own_comparison_would_ignore_is_refused(tmp_path: Path) -> None:
    """Without --from, suggest-split's comparison checks its options as compare does."""
    argv = ["suggest-split", "--model", "resnet18", "--weights", "none", "--scale", "16"]
    line = assert_refused(main, argv, "--scale", tmp_path)
    assert "Hint:" in line


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_cli_a_real_comparison_over_few_minibatches_says_so(tmp_path: Path) -> None:
    common = ["compare", "--model", "resnet18", "--weights", "none", "--scales", "8", "16"]
    common += ["--image-size", "16", "--batch-size", "16", "--bootstrap", "100", "--no-figures"]
    two_batches = [*common, "--num-images", "32", "--out", str(tmp_path / "n32")]
    assert CliRunner().invoke(main, two_batches).exit_code == 0
    one_batch = [*common, "--num-images", "16", "--out", str(tmp_path / "n16")]
    done = CliRunner().invoke(main, one_batch)
    assert done.exit_code == 0, done.output
    assert "note: 1 batch(es) cannot be bootstrapped" in done.stderr  # the CLI's one-line note
    two = CliRunner().invoke(main, ["suggest-split", "--from", str(tmp_path / "n32")])
    assert two.exit_code == 0, two.output
    assert "only 2 minibatches: too few to judge stability" in " ".join(two.stdout.split())
    assert "(stable:" not in two.stdout
    one = CliRunner().invoke(main, ["suggest-split", "--from", str(tmp_path / "n16")])
    assert one.exit_code == 0, one.output
    text = " ".join(one.stdout.split())
    assert "fewer than 2 minibatches, nothing to resample" in text
    assert "--bootstrap 1000" not in text


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--split-points", "layer2,layer2"], "--split-points lists layer2 twice"),
        (["--split-points", "layer2,layerX"], "--split-points layerX: not a legal split point"),
        (["--model-b", "resnet34", "--scale", "16"], "--model-b / --checkpoint-b compare two"),
        (["--annotate"], "suggest-split without --out saves no result and draws no figure"),
        (["--model", "vit_b_16"], "no registered model family knows the split points"),
        (["--no-figures"], "suggest-split without --out saves no result and draws no figure"),
    ],
)
def test_cli_a_split_request_it_would_refuse_is_refused_before_its_comparison(
    tmp_path: Path, extra: list[str], needle: str
) -> None:
    """--layers nosuch fails once the comparison starts: these must be refused before that."""
    argv = ["suggest-split", "--model", "resnet18", "--weights", "none", "--layers", "nosuch"]
    line = assert_refused(main, [*argv, *extra], needle, tmp_path)
    assert "nosuch" not in line
    assert "Hint:" in line
