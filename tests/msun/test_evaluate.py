"""msun.evaluate (msun eval): checkpoints of other data or sizes refused, the numbers against a
direct computation, scoring in channels-last, the protocol each column ran under, and what the
result files record to score a checkpoint again."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner, Result

from ckascope.views import resize
from msun import build_msun, save_checkpoint
from msun.cli import main
from msun.evaluate import (
    Loaded,
    check_runnable,
    evaluate,
    evaluate_checkpoints,
    load_for_eval,
    unique_labels,
)
from msun.plot import accuracy_vs_size
from msun.privatebn import build_scale_bn_net


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_refuses_checkpoints_of_other_data_or_sizes_unless_told_which(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(model, tmp_path / "a.pt", train_config={"data": "shapes", "image_size": 32})
    save_checkpoint(model, tmp_path / "b.pt", train_config={"data": "shapes", "image_size": 48})
    args = ["eval", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--num-val", "8"]
    args += ["--eval-sizes", "16,32", "--out", str(tmp_path / "eval")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert "different image sizes (32, 48)" in refused.output
    assert "or pass --image-size to evaluate every one on the same test images" in refused.output
    assert not (tmp_path / "eval").exists()
    told = CliRunner().invoke(main, [*args, "--image-size", "32", "--batch-size", "4"])
    assert told.exit_code == 0, told.output


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_numbers_match_a_direct_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    msun_model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(msun_model, tmp_path / "msun.pt")
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(tmp_path / "msun.pt"),
            "--eval-sizes",
            "16,24,32",
            "--image-size",
            "32",
            "--num-val",
            "12",
            "--batch-size",
            "5",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())[0]
    from ckascope.data import build_dataset, eval_transform, subset_indices

    data = build_dataset("shapes", "val", eval_transform(32, 37), num_images=12, synthetic_size=32)
    idx = subset_indices(len(data), None, 0)
    images = torch.stack([data[i][0] for i in idx])
    labels = torch.tensor([data[i][1] for i in idx])
    with torch.no_grad():
        for i, size in enumerate([16, 24, 32]):
            x = (
                torch.nn.functional.interpolate(
                    images, size=(size, size), mode="bilinear", align_corners=False
                )
                if size != 32
                else images
            )
            for k in range(2):
                pred = msun_model.forward_path(x, k).argmax(1)
                assert summary["top1_per_path"][i][k] == pytest.approx(
                    100 * float((pred == labels).float().mean())
                )
            assert summary["path"][i] == (0 if size <= 16 else 1)
    assert summary["mean_top1"] == pytest.approx(np.mean(summary["top1"]))
    assert summary["images"] == 12
    assert summary["memory_format"] == "channels_last"  # auto on a CPU; the reference: contiguous
    assert {p.name for p in out.iterdir()} == {
        "eval.csv",
        "eval.json",
        "figure4.png",
        "figure4.pdf",
    }


def test_evaluation_in_channels_last_scores_alike_and_gives_the_model_back() -> None:
    from msun.evaluate import evaluate

    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).train()
    before = [(n, t.data_ptr(), t.stride(), t.clone()) for n, t in model.state_dict().items()]
    batches = [(torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))) for _ in range(2)]
    run = {"sizes": [12, 32], "image_size": 32}
    plain = evaluate(model, batches, memory_format="contiguous", **run)
    fast = evaluate(model, batches, memory_format="channels_last", **run)
    np.testing.assert_allclose(fast.top1, plain.top1)
    np.testing.assert_allclose(fast.top5, plain.top5)
    assert (plain.info, fast.info) == (
        {"memory_format": "contiguous"},
        {"memory_format": "channels_last"},
    )
    after = model.state_dict()
    for name, ptr, stride, value in before:
        assert (after[name].data_ptr(), after[name].stride()) == (ptr, stride), name
        assert torch.equal(after[name], value), name
    assert model.training


def test_a_private_bn_mst_network_runs_and_is_recorded_under_upsample_whatever_was_asked() -> None:
    """MST's input protocol (docs/msun.md): set k sees the test image brought back up to the
    training size, under --protocol native too; the result says so."""
    torch.manual_seed(0)
    model = build_scale_bn_net("resnet18", scales=(8, 16), num_classes=4, image_size=16).eval()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.rand(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g))]
    got = evaluate(model, batches, [8, 16], protocol="native", image_size=16)
    assert got.protocol == "upsample"
    assert got.images == 6
    (x, y) = batches[0]
    with torch.no_grad():
        for i, size in enumerate([8, 16]):
            for k in range(2):
                logits = model.forward_path(resize(x, size), k, protocol="upsample")
                want = 100 * float((logits.argmax(1) == y).float().mean())
                assert got.top1[i, k] == pytest.approx(want), (size, k)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_columns_of_different_protocols_are_named_per_column(tmp_path: Path) -> None:
    torch.manual_seed(0)
    msun_model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    mst = build_scale_bn_net("resnet18", scales=(16, 32), num_classes=10, image_size=32).eval()
    config = {"data": "shapes", "image_size": 32, "eval_sizes": "16,32", "seed": 3}
    save_checkpoint(msun_model, tmp_path / "msun.pt", train_config=config)
    save_checkpoint(mst, tmp_path / "mst.pt", train_config={**config, "method": "mst"})
    args = ["eval", str(tmp_path / "msun.pt"), str(tmp_path / "mst.pt"), "--num-val", "8"]
    native = CliRunner().invoke(main, [*args, "--protocol", "native", "--out", str(tmp_path / "n")])
    assert native.exit_code == 0, native.output
    assert "top-1 (%) per test size, protocol per column" in native.output
    assert "per test size, upsample protocol" not in native.output  # the old, wrong title
    assert "native protocol" in native.output
    assert "upsample protocol" in native.output
    assert "note: --protocol native applies to MSUN paths; mst saw" in native.output
    summaries = json.loads((tmp_path / "n" / "eval.json").read_text())
    assert [s["protocol"] for s in summaries] == ["native", "upsample"]
    with open(tmp_path / "n" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["checkpoint"], r["protocol"]) for r in rows} == {
        ("msun", "native"),
        ("mst", "upsample"),
    }
    upsample = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "u")])
    assert upsample.exit_code == 0, upsample.output
    assert "top-1 (%) per test size, upsample protocol" in upsample.output
    assert "note:" not in upsample.output
    again = json.loads((tmp_path / "u" / "eval.json").read_text())[1]
    assert again["top1_per_path"] == summaries[1]["top1_per_path"]  # what ran: upsample both times


def _summary(name: str, protocol: str) -> dict[str, object]:
    return {
        "checkpoint": name,
        "variant": "msun",
        "method": "msun",
        "protocol": protocol,
        "sizes": [16, 32],
        "top1": [10.0, 20.0],
        "mean_top1": 15.0,
        "mean_flops": 1e9,
        "parameters": 1e6,
    }


def test_the_figure_names_the_protocol_only_when_every_curve_shares_it() -> None:
    mixed = accuracy_vs_size([_summary("a", "native"), _summary("b", "upsample")])
    assert mixed.axes[0].get_title() == "Accuracy vs test size (protocol per curve)"
    labels = [t.get_text() for t in mixed.legends[0].get_texts()]
    assert "native protocol" in labels[0]
    assert "upsample protocol" in labels[1]
    same = accuracy_vs_size([_summary("a", "native"), _summary("b", "native")])
    assert same.axes[0].get_title() == "Accuracy vs test size (native protocol)"
    assert all("protocol" not in t.get_text() for t in same.legends[0].get_texts())


def test_checkpoints_that_share_a_label_get_labels_apart(tmp_path: Path) -> None:
    runs = Path("runs")
    assert unique_labels([runs / "rs/best.pt", runs / "rs/last.pt"]) == ["rs/best", "rs/last"]
    assert unique_labels([runs / "van/best.pt", runs / "rs/best.pt"]) == ["van", "rs"]
    assert unique_labels([Path("a/rs/best.pt"), Path("b/rs/best.pt"), runs / "x.pt"]) == [
        "a/rs/best",
        "b/rs/best",
        "x",
    ]
    assert unique_labels([Path("m.pt"), Path("m.pt")]) == ["m", "m#2"]


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_records_what_scores_a_checkpoint_again(tmp_path: Path) -> None:
    """The file, data, image size and images scored; best.pt and last.pt of one run apart."""
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    (tmp_path / "rs").mkdir()
    config = {"data": "shapes", "image_size": 32, "eval_sizes": "16,32", "seed": 3}
    save_checkpoint(model, tmp_path / "rs" / "best.pt", train_config={**config, "distill": False})
    save_checkpoint(model, tmp_path / "rs" / "last.pt", train_config=config)  # no "distill"
    out = tmp_path / "ev"
    args = ["eval", str(tmp_path / "rs" / "best.pt"), str(tmp_path / "rs" / "last.pt")]
    result = CliRunner().invoke(main, [*args, "--num-val", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "rs/best" in result.output
    assert "rs/last" in result.output
    best, last = json.loads((out / "eval.json").read_text())
    assert (best["checkpoint"], last["checkpoint"]) == ("rs/best", "rs/last")
    assert best["checkpoint_path"] == str((tmp_path / "rs" / "best.pt").absolute())
    assert last["checkpoint_path"] == str((tmp_path / "rs" / "last.pt").absolute())
    for summary in (best, last):
        assert (summary["data"], summary["image_size"], summary["images"]) == ("shapes", 32, 8)
        assert summary["test_draw_seed"] == 3  # the first checkpoint's run drew the images
    assert best["distill"] is False
    assert "distill" not in last
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["checkpoint"] for r in rows} == {"rs/best", "rs/last"}
    assert {(r["data"], r["image_size"], r["images"], r["test_draw_seed"]) for r in rows} == {
        ("shapes", "32", "8", "3")
    }
    assert {r["checkpoint_path"] for r in rows} == {
        best["checkpoint_path"],
        last["checkpoint_path"],
    }


def _fed_sides(path: Path) -> set[int]:
    """The input sides ``evaluate_checkpoints`` feeds the network of checkpoint ``path``."""
    loaded = load_for_eval(path)
    fed: set[int] = set()
    loaded.model.register_forward_pre_hook(lambda m, args: fed.add(args[0].shape[-1]))
    batches = [(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))]
    run = {"protocol": "upsample", "paths": "all", "device": torch.device("cpu")}
    evaluate_checkpoints([loaded], batches, [8, 16], data="shapes", image_size=16, **run)  # type: ignore[arg-type]
    return fed


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_fine_tuned_plain_network_is_scored_at_the_size_it_was_trained_at(
    tmp_path: Path,
) -> None:
    """Its 16-px crops reached it resized to its source checkpoint's 32 px, in training and in
    its run's validation; msun eval of its last.pt, on the images that validation drew, gives
    the run's last accuracies. A checkpoint written before the size was recorded is fed its
    run's image size, as it was then."""
    from msun.flops import vanilla_flops

    # a learning rate that leaves the random network's predictions depending on the input's
    # size: a trained one this small predicts one class whatever it is fed
    common = ["--model", "resnet18", "--batch-size", "8", "--num-train", "16", "--lr", "1e-5"]
    common += ["--num-val", "16", "--epochs", "1"]
    src, tuned = tmp_path / "src", tmp_path / "tuned"
    args = ["--method", "vanilla", "--image-size", "32", "--eval-sizes", "32"]
    done = CliRunner().invoke(main, ["train", *common, *args, "--out", str(src)])
    assert done.exit_code == 0, done.output
    args = ["--init-from", str(src / "last.pt"), "--image-size", "16", "--eval-sizes", "8,16"]
    done = CliRunner().invoke(main, ["train", *common, *args, "--out", str(tuned)])
    assert done.exit_code == 0, done.output
    assert f"fine-tuning of {src / 'last.pt'} at 32 px (16-px images resized)" in done.stdout
    row = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[-1])
    out = tmp_path / "ev"
    scored = ["eval", str(tuned / "last.pt"), "--num-val", "16", "--batch-size", "8"]
    result = CliRunner().invoke(main, [*scored, "--memory-format", "contiguous", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())[0]
    assert (summary["sizes"], summary["image_size"]) == ([8, 16], 16)
    assert summary["top1"] == pytest.approx([row["val_top1_8"], row["val_top1_16"]])
    assert summary["flops"] == [vanilla_flops("resnet18", 32, 10)] * 2
    assert _fed_sides(tuned / "last.pt") == {32}
    old = torch.load(tuned / "last.pt", weights_only=True)
    del old["inputs"]["input_size"]
    torch.save(old, tmp_path / "old.pt")
    assert _fed_sides(tmp_path / "old.pt") == {16}


# ----------------------------------------------------------------------------- what eval scores


def _class_folders(root: Path, classes: tuple[str, ...], count: int) -> Path:
    """``count`` random 32x32 images in a sub-folder of ``root`` per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An msun checkpoint of two classes at 32 px, beside nothing else."""
    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=2).eval()
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(model, path, train_config={"data": "shapes", "image_size": 32})
    return path


def _refusals(tmp_path: Path, checkpoint: Path) -> list[tuple[list[str], str]]:
    """(msun eval arguments, words of the one line) for what eval refuses before scoring."""
    plain = tmp_path / "tv.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), plain)
    _class_folders(tmp_path / "noval" / "train", ("a", "b"), 1)
    _class_folders(tmp_path / "small" / "val", ("a", "b"), 1)
    ckpt, out = str(checkpoint), ["--out", str(tmp_path / "ev")]
    return [
        (
            [str(plain), *out],
            f"Error: {plain} does not name its model (a plain state dict?): msun eval scores "
            "checkpoints that do, such as msun train's last.pt and best.pt. Hint: give such a "
            f"checkpoint; analyse a plain state dict with ckascope compare --checkpoint {plain} "
            "--model NAME",
        ),
        ([ckpt, "--data", str(tmp_path / "noval"), *out], "noval has no val/ folder. Hint:"),
        (
            [ckpt, "--data", str(tmp_path / "nowhere"), *out],
            # leaving --data out scores the run's own data: shapes is the synthetic set
            "or shapes for the synthetic set; or omit --data for the data the run was trained on",
        ),
        (
            [ckpt, "--data", str(tmp_path / "small"), "--num-val", "3", *out],
            "--num-val 3 asks for more validation images than "
            f"{tmp_path / 'small'} holds: 2. Hint: give --num-val 2 or fewer",
        ),
    ]


@pytest.mark.parametrize(
    "case", range(4), ids=["plain-state-dict", "train-without-val", "missing-data", "num-val"]
)
def test_eval_refuses_before_scoring(tmp_path: Path, two_classes: Path, case: int) -> None:
    from tests.refusals import assert_refused

    argv, needle = _refusals(tmp_path, two_classes)[case]
    assert_refused(main, ["eval", *argv], needle, tmp_path)


def _ten_classes(path: Path, **extra: Any) -> Path:
    """A 10-class MSUN checkpoint (16 / 32 px) at ``path``, with ``extra`` entries."""
    torch.manual_seed(0)
    save_checkpoint(build_msun("resnet18", scales=(16, 32), num_classes=10).eval(), path, **extra)
    return path


def _scored(tmp_path: Path, *args: str) -> Result:
    """``msun eval args`` at 32 px, routed paths only, into tmp_path/ev; it must succeed."""
    argv = ["eval", *args, "--eval-sizes", "32", "--paths", "routed", "--out", str(tmp_path / "ev")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_model_of_other_data_scored_on_the_synthetic_set_is_noted(tmp_path: Path) -> None:
    """As ckascope compare --checkpoint notes it: its scores are not of its own images."""
    ckpt = _ten_classes(tmp_path / "fm.pt", train_config={"data": "fashionmnist", "image_size": 32})
    result = _scored(tmp_path, str(ckpt), "--data", "shapes", "--num-val", "8", "--batch-size", "8")
    assert (
        f"note: {ckpt.absolute()} was trained on fashionmnist; these are the synthetic images. "
        "Hint: leave --data out (or --data fashionmnist) to score it on its own"
    ) in result.stderr
    assert "eval fm (1 size): 1/1 (" in result.output  # its progress, without a terminal


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_a_checkpoint_given_twice_is_noted(tmp_path: Path) -> None:
    ckpt = _ten_classes(tmp_path / "m.pt")
    result = _scored(tmp_path, str(ckpt), str(ckpt), "--num-val", "4", "--batch-size", "4")
    assert (
        f"note: {ckpt} is given 2 times: it is evaluated each time, as m, m#2. "
        "Hint: give each checkpoint once"
    ) in result.stderr


def test_notes_wait_for_the_last_refusal(tmp_path: Path) -> None:
    """A refused call prints its one line, not the notes a scored one would get first."""
    from tests.refusals import assert_refused

    torch.manual_seed(0)
    ckpt = tmp_path / "fm.pt"
    model = build_msun("resnet18", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(model, ckpt, train_config={"data": "fashionmnist", "image_size": 32})
    argv = ["eval", str(ckpt), str(ckpt), "--data", "shapes", "--recalibrate-bn", "300000"]
    needle = "--recalibrate-bn 300000 asks for more training images"
    assert_refused(main, [*argv, "--out", str(tmp_path / "ev")], needle, tmp_path)


def test_the_recorded_data_that_cannot_be_read_is_named_as_the_checkpoints(
    tmp_path: Path,
) -> None:
    """Without --data, eval reads the run's own data: omitting --data is no remedy then."""
    from tests.refusals import assert_refused

    torch.manual_seed(0)
    ckpt = tmp_path / "m.pt"
    gone = tmp_path / "moved"
    model = build_msun("resnet18", scales=(16, 32), num_classes=2).eval()
    save_checkpoint(model, ckpt, train_config={"data": str(gone), "image_size": 32})
    line = assert_refused(main, ["eval", str(ckpt), "--out", str(tmp_path / "ev")], "", tmp_path)
    assert str(gone) in line
    assert line.endswith(
        "(the data the checkpoint records). Hint: give --data where those images are now, or "
        "--data shapes for the synthetic set"
    )


def test_ckascope_keeps_its_own_words_for_a_plain_state_dict(tmp_path: Path) -> None:
    """msun eval's message is its own; ckascope compare still asks for --model."""
    from ckascope.errors import InputError
    from ckascope.models import load_checkpoint

    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "tv.pt")
    with pytest.raises(InputError, match=r"plain state dict\. Hint: name its architecture with"):
        load_checkpoint(tmp_path / "tv.pt")


def test_unreadable_images_are_named_once_and_counted_apart_from_the_scored() -> None:
    """Recalibrating passes over the test images once per size and path: one warning each."""
    from ckascope.data import Batch, Skipped
    from ckascope.errors import LocalWarning

    torch.manual_seed(0)
    model = build_msun("resnet18", scales=(16, 32), num_classes=4).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 3, 32, 32, generator=g), torch.randint(0, 4, (5,), generator=g)
    bad = [Skipped(f"bad{i}.png", "truncated") for i in range(3)]
    batches = [
        Batch(x[:3], y[:3], bad[:1]),
        Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad[1:]),  # all unreadable
        Batch(x[3:], y[3:], []),
    ]
    recal = [(torch.rand(4, 3, 32, 32, generator=g), torch.zeros(4, dtype=torch.long))]
    with pytest.warns(LocalWarning) as caught:
        got = evaluate(model, batches, [16, 32], image_size=32, recalibration=recal)
    named = [str(w.message) for w in caught if issubclass(w.category, LocalWarning)]
    assert named == [f"skipped unreadable image bad{i}.png (truncated)" for i in range(3)]
    assert (got.images, got.skipped) == (5, 3)
    plain = evaluate(model, [(x, y)], [16, 32], image_size=32, recalibration=recal)
    np.testing.assert_allclose(got.top1, plain.top1)  # over the 5 images scored, not 8


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_records_unreadable_images_and_names_a_folder_scored_in_place(
    tmp_path: Path, two_classes: Path
) -> None:
    imgs = _class_folders(tmp_path / "imgs" / "val", ("a", "b"), 3).parent
    (imgs / "val" / "a" / "broken.png").write_bytes(b"not a png")
    args = ["eval", str(two_classes), "--eval-sizes", "16,32", "--batch-size", "4"]
    result = CliRunner().invoke(main, [*args, "--data", str(imgs), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert f"skipped unreadable image {imgs / 'val' / 'a' / 'broken.png'}" in result.stderr
    assert "has no val/ folder" not in result.output
    summary = json.loads((tmp_path / "e" / "eval.json").read_text())[0]
    assert (summary["images"], summary["skipped_images"]) == (6, 1)
    hits = np.array(summary["top1_per_path"]) * 6 / 100  # percent of the 6 images scored
    np.testing.assert_allclose(hits, np.round(hits), atol=1e-9)
    with open(tmp_path / "e" / "eval.csv") as f:
        assert {(r["images"], r["skipped_images"]) for r in csv.DictReader(f)} == {("6", "1")}
    val = imgs / "val"
    in_place = CliRunner().invoke(main, [*args, "--data", str(val), "--out", str(tmp_path / "v")])
    assert in_place.exit_code == 0, in_place.output
    assert f"note: {val} has no val/ folder: scoring the images of its own class" in " ".join(
        in_place.output.split()
    )


def _meta_loaded(arch: str, scales: tuple[int, ...]) -> Loaded:
    """A checkpoint as msun eval loads it, its MSUN on the meta device (shapes only)."""
    with torch.device("meta"):
        model = build_msun(arch, scales=scales, num_classes=10)
    size = scales[-1]
    return Loaded("m", model, "msun", arch, size, None, "shapes", input_size=size)


@pytest.mark.parametrize(
    ("arch", "scales", "run", "words"),
    [
        # densenet121's 16-px path takes 3 px fed as they are, its 32-px path 5 px and up
        (
            "densenet121",
            (16, 32),
            ([4, 16, 32], "native", "all"),
            "cannot take test size(s) 4 on path 1 (nominal 32): fed as they are (--protocol "
            "native), they shrink to nothing in its down-sampling. Hint: give --paths routed, "
            "or --eval-sizes 16,32, or --protocol upsample (each path at its nominal size)",
        ),
        (
            "densenet121",
            (16, 32),
            ([2, 4, 32], "native", "routed"),
            "cannot take test size(s) 2 on the path each is routed to: fed as they are "
            "(--protocol native), they shrink to nothing in its down-sampling. Hint: give "
            "--eval-sizes 4,32, or --protocol upsample",
        ),
        # vgg11's trunk after features.11 needs more than the 3 px its 28-px path gives it
        ("vgg11", (8, 28), ([28], "upsample", "routed"), "path(s) 1 shrink their own"),
    ],
)
def test_sizes_a_path_cannot_take_are_named_with_what_runs_instead(
    arch: str, scales: tuple[int, ...], run: tuple[list[int], str, str], words: str
) -> None:
    from ckascope.errors import InputError

    with pytest.raises(InputError) as refused:
        check_runnable([_meta_loaded(arch, scales)], *run)  # type: ignore[arg-type]
    assert words in str(refused.value)


def test_sizes_every_path_takes_pass_the_check() -> None:
    check_runnable([_meta_loaded("densenet121", (16, 32))], [5, 16, 32], "native", "all")
    check_runnable([_meta_loaded("densenet121", (16, 32))], [1, 32], "upsample", "all")
    check_runnable([_meta_loaded("resnet18", (4, 28))], [1, 28], "native", "all")


def test_no_checkpoint_is_scored_before_every_one_is_checked() -> None:
    """The second checkpoint's refusal comes before the first is scored, not minutes after."""
    from ckascope.errors import InputError

    class Unread:
        def __iter__(self) -> Iterator[object]:
            raise AssertionError("scored before the sizes were checked")

    fine = Loaded(
        "a",
        build_msun("resnet18", scales=(4, 28), num_classes=10),
        "msun",
        "r",
        28,
        None,
        "shapes",
        input_size=28,
    )
    args = {"protocol": "native", "paths": "all", "device": torch.device("cpu")}
    with pytest.raises(InputError, match="cannot take test size"):
        evaluate_checkpoints(
            [fine, _meta_loaded("densenet121", (16, 32))],
            Unread(),
            [4, 32],
            data="shapes",
            image_size=32,
            **args,  # type: ignore[arg-type]
        )


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_eval_refuses_sizes_a_path_cannot_take_before_reading_the_data(tmp_path: Path) -> None:
    """Before the test images are even read (here: a folder that does not exist)."""
    from tests.refusals import assert_refused

    torch.manual_seed(0)
    model = build_msun("densenet121", scales=(16, 32), num_classes=10).eval()
    save_checkpoint(model, tmp_path / "d.pt", train_config={"data": "shapes", "image_size": 32})
    argv = ["eval", str(tmp_path / "d.pt"), "--eval-sizes", "2", "16", "32"]
    argv += [
        "--protocol",
        "native",
        "--data",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path / "ev"),
    ]
    line = assert_refused(main, argv, "cannot take test size(s) 2 on the path each is", tmp_path)
    assert line.startswith("Error: d (densenet121 MSUN split at denseblock2, scales 16, 32)")
