"""FLOP and parameter accounting, and the ``msun flops`` command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import msun
from ckascope.errors import InputError
from msun.cli import main
from msun.config import paper_sizes
from msun.flops import flops_report
from tests.msun.builds import meta_msun

TEST_SIZES = tuple(paper_sizes(224))  # the published evaluation's


def test_test_sizes() -> None:
    assert TEST_SIZES == (32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224)


def test_largest_path_at_224_costs_what_vanilla_costs() -> None:
    model = meta_msun("resnet50")
    assert msun.path_flops(model, 2, 224) == msun.vanilla_flops("resnet50", 224)
    assert msun.path_macs(model, 2, 224) * 2 == msun.path_flops(model, 2, 224)


def test_meta_counts_equal_counts_of_a_real_forward() -> None:
    torch.manual_seed(0)
    model = msun.build_msun("resnet18", num_classes=5).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_path(torch.zeros(1, 3, 48, 48), 1, protocol="native")
    assert msun.path_flops(model, 1, 48) == counter.get_total_flops()
    assert model.training is False
    model.train()
    msun.path_flops(model, 0, 32)
    assert all(m.training for m in model.modules())


def test_resnet18_s1_flops_by_hand() -> None:
    # The trunk sees the same 56x56 input on every path, so two paths differ by their stems
    # and layer1 (four 3x3 64->64 convs) only. MACs = out_h * out_w * c_out * c_in * k * k.
    model = meta_msun("resnet18")
    s1 = 34 * 34 * 64 * 3 * 3 * 3 + 4 * 34 * 34 * 64 * 64 * 9  # 3x3/1 pad 2 at 32 -> 34
    s3 = 112 * 112 * 64 * 3 * 7 * 7 + 4 * 56 * 56 * 64 * 64 * 9  # 7x7/2 -> 112, pool -> 56
    difference = msun.path_flops(model, 0, 32) - msun.path_flops(model, 2, 224)
    assert difference == 2 * (s1 - s3)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_report_means_equal_the_per_size_path_counts() -> None:
    model = meta_msun("resnet18", num_classes=10)
    report = flops_report(model)
    accuracy, native = [], []
    for size in TEST_SIZES:
        k = model.route(size)
        accuracy.append(msun.path_flops(model, k, model.scales[k]))
        native.append(msun.path_flops(model, k, size))
    vanilla = msun.vanilla_flops("resnet18", 224, num_classes=10)
    assert [row.path for row in report.rows] == [0] + [1] * 6 + [2] * 6
    assert report.mean("upsample") == pytest.approx(sum(accuracy) / 13)
    assert report.mean("native") == pytest.approx(sum(native) / 13)
    assert report.vanilla == vanilla
    assert report.saving("native") == pytest.approx(100 * (1 - sum(native) / 13 / vanilla))
    assert report.to_dict()["parameters"]["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_report_of_a_real_model_uses_its_structure() -> None:
    torch.manual_seed(0)
    real = msun.build_msun("resnet18", scales=(32, 224), routing=(100,), num_classes=5)
    report = flops_report(real)
    assert [row.path for row in report.rows] == [0] * 5 + [1] * 8
    assert report.path_flops == tuple(msun.path_flops(real, k, s) for k, s in enumerate((32, 224)))


def test_cli_json_matches_the_library() -> None:
    args = ["flops", "--model", "resnet18", "--scales", "32", "128", "224", "--num-classes", "7"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = flops_report(meta_msun("resnet18", num_classes=7))
    assert data["scales"] == [32, 128, 224]
    assert data["mean_flops"]["native"] == pytest.approx(report.mean("native"))
    assert data["fewer_flops_percent"]["upsample"] == pytest.approx(report.saving("upsample"))
    assert [row["size"] for row in data["sizes"]] == list(TEST_SIZES)
    assert data["parameters"]["vanilla"] == report.parameters.vanilla


def test_cli_table() -> None:
    args = ["flops", "--model", "resnet18", "--split-at", "layer3", "--scales", "64,224"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for text in ("trunk from layer3", "fewer FLOPs", "S2 (224)", "MSUN total", "vanilla"):
        assert text in result.stdout
    assert "BatchNorm set" not in result.stdout
    private = CliRunner().invoke(main, [*args, "--bn", "private"])
    assert private.exit_code == 0, private.output
    assert "trunk from layer3, a BatchNorm set per path):" in private.stdout  # the title
    assert "trunk, a BatchNorm set per path" in private.stdout  # the parameter table's row


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model", "resnet51"], "did you mean resnet50"),
        (["--model", "resnet18", "--split-at", "layer9"], "layer1, layer2, layer3, layer4"),
        (["--model", "resnet18", "--scales", "224", "32"], "increasing order"),
        (["--model", "resnet18", "--scales", "-32", "224"], "positive"),
        (["--model", "resnet18", "--scales", "32", "x"], "not a list of integers"),
        (["--model", "resnet18", "--num-classes", "1"], "'--num-classes': 1 is not in the range"),
        (["--model", "resnet18", "--image-size", "100000"], "'--image-size': 100000 is not in"),
        (["--model", "resnet18", "--image-size", "3"], "'--image-size': 3 is not in"),
        (["--model", "resnet18", "--scales", "4", "16", "99999"], "positive integers up to 4096"),
        (["--model", "vgg11", "--image-size", "28"], "vanilla runs at --image-size 28"),
        (["--model", "vgg11", "--scales", "4", "16", "28"], "make the largest of --scales 32"),
        (
            ["--model", "densenet121", "--image-size", "64", "--scales", "4", "16", "28"],
            "densenet121 needs images of at least 29 px",
        ),
        (["--model", "vgg11", "--image-size", "32"], "--eval-sizes 5,9,11,14,16,18,21"),
    ],
)
def test_cli_errors_are_one_line(args: list[str], match: str) -> None:
    result = CliRunner().invoke(main, ["flops", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ")
    assert match in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_cli_sizes_and_vanilla_follow_the_scales() -> None:
    args = ["flops", "--model", "resnet18", "--scales", "4", "16", "28", "--num-classes", "10"]
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert [row["size"] for row in data["sizes"]] == list(range(4, 29, 2))  # 1/7 .. 1 of 28
    assert data["image_size"] == 28
    assert data["vanilla_flops"] == msun.vanilla_flops("resnet18", 28, num_classes=10)
    model = meta_msun("resnet18", scales=(4, 16, 28), num_classes=10)
    native = [msun.path_flops(model, model.route(s), s) for s in range(4, 29, 2)]
    assert data["mean_flops"]["native"] == pytest.approx(sum(native) / 13)
    given = json.loads(CliRunner().invoke(main, [*args, "--eval-sizes", "8,28", "--json"]).stdout)
    assert [row["size"] for row in given["sizes"]] == [8, 28]
    assert [row["path"] for row in given["sizes"]] == [1, 2]
    # the image size alone: the paper's scales at 28 px, the same report
    sized = ["flops", "--model", "resnet18", "--image-size", "28", "--num-classes", "10", "--json"]
    derived = json.loads(CliRunner().invoke(main, sized).stdout)
    assert derived["scales"] == [4, 16, 28]
    assert derived["mean_flops"] == data["mean_flops"]


def test_an_image_size_apart_from_the_largest_scale_is_noted() -> None:
    args = ["flops", "--model", "resnet18", "--scales", "4", "16", "28", "--json"]
    apart = CliRunner().invoke(main, [*args, "--image-size", "1000"])
    assert apart.exit_code == 0, apart.output
    assert "note: vanilla runs at --image-size 1000 and the MSUN's largest path at 28" in (
        apart.stderr
    )
    assert json.loads(apart.stdout)["image_size"] == 1000  # noted, still counted as asked
    same = CliRunner().invoke(main, [*args, "--image-size", "28"])
    assert same.exit_code == 0, same.output
    assert "note" not in same.stderr


def test_native_sizes_a_path_cannot_take_are_refused_by_the_library() -> None:
    model = meta_msun("vgg11", scales=(5, 18, 32))
    with pytest.raises(InputError, match=r"test size\(s\) 7 shrink to nothing"):
        flops_report(model, (5, 7, 32))
    assert [row.size for row in flops_report(model, (5, 8, 32)).rows] == [5, 8, 32]


def test_the_old_sizes_flag_still_works_and_names_the_new_one() -> None:
    args = ["flops", "--model", "resnet18", "--image-size", "28", "--json"]
    new = CliRunner().invoke(main, [*args, "--eval-sizes", "8,28"])
    old = CliRunner().invoke(main, [*args, "--sizes=8,28"])
    assert old.exit_code == 0, old.output
    assert json.loads(old.stdout) == json.loads(new.stdout)
    assert "--sizes is now --eval-sizes" in old.stderr
    assert "is now" not in new.stderr
