"""Hostile input, third round: config files, numbers, sizes, labels and data, result files, run
folders, MSUN-only options (the command line, as a user runs it), and the Python API.

Every command-line case must exit non-zero with exactly one line on stderr that names the
problem, print no traceback, and leave no new file behind (``tests/test_reliability.py``'s
rule); every API case must raise the project's error (or TypeError) naming the argument.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ckascope import CKAResult, SideSpec, SweepOptions, ViewOptions, compare_scales, compare_sides
from ckascope.cli import main as ckascope_main
from ckascope.data import SafeImageFolder
from ckascope.errors import InputError
from msun.cli import main as msun_main
from tests import tinyrun
from tests.idxfiles import write_idx
from tests.refusals import assert_refused

R18 = ["maxpool"] + [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]


def _labels_file(folder: Path, labels: list[int]) -> None:
    """Training labels of a written idx set replaced by these."""
    blob = struct.pack(">II", 2049, len(labels)) + bytes(labels)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(blob))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """The hostile files the table points at, by name."""
    made = tmp_path / "files"
    made.mkdir()
    (made / "deep.yaml").write_text("[" * 100_000)
    (made / "laughs.yaml").write_text("a: &a [x, x]\nb: &b [*a, *a, *a]\nout: *b\n")
    (made / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01\x80model")
    (made / "big.yaml").write_text("# padding\n" * 200_000)
    (made / "list_out.yaml").write_text("out: [runs, a]\n")
    (made / "int_key.yaml").write_text("1: x\n")
    (made / "nan_lr.yaml").write_text("lr: .nan\n")
    (made / "word_lr.yaml").write_text('lr: "fast"\n')
    (made / "afile").write_text("x")
    write_idx(made / "badlabels", 32, gz=True)
    write_idx(made / "idx", 32, gz=True)  # 16 validation images
    # a run's own config.yaml records MSUN's split and loss (resolved), as msun train writes it
    (made / "msun_run.yaml").write_text(
        "model: resnet18\nmethod: msun\nsplit_at: layer2\ncka_from: null\nsi_threshold: 0.01\n"
    )
    _labels_file(made / "badlabels", [1, 2, 12] + [0] * 29)
    no_layers = CKAResult(np.eye(2)[None], ["a", "b"], ["a", "b"], {"mode": "scales"})
    no_layers.save(made / "no_layers")
    meta = (made / "no_layers" / "result.json").read_text().replace('"layers_a"', '"layers_x"')
    (made / "no_layers" / "result.json").write_text(meta)
    nan = np.full((1, 9, 9), np.nan)
    CKAResult(nan, R18, R18, {"mode": "scales", "model": "resnet18"}).save(made / "nan_result")
    run = made / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"")
    (made / "eval_out").mkdir()
    (made / "eval_out" / "mine.txt").write_text("mine")
    return {p.name.replace(".", "_"): p for p in made.iterdir()}


T, E, F, C, S = "train", "eval", "flops", "compare", "suggest-split"
MSUN, CKA = "msun", "ckascope"
# (class, tool, command, arguments, words the one-line message must contain)
CASES: list[tuple[str, str, str, list[str], str]] = [
    ("config", MSUN, T, ["--config", "{deep_yaml}"], "nests too deep"),
    ("config", MSUN, T, ["--config", "{laughs_yaml}"], "aliases (*a) are not supported"),
    ("config", MSUN, T, ["--config", "{binary_yaml}"], "not UTF-8 text"),
    ("config", MSUN, T, ["--config", "{big_yaml}"], "too large for a config file"),
    ("config", MSUN, T, ["--config", "{list_out_yaml}"], "out takes str, got a list of 2"),
    ("config", MSUN, T, ["--config", "{int_key_yaml}"], "option names are words"),
    ("config", MSUN, T, ["--config", "{run}"], "is a folder, not a YAML file. Hint: give the"),
    (
        "numbers",
        MSUN,
        T,
        ["--config", "{nan_lr_yaml}"],
        "--lr nan (from {nan_lr_yaml}) must be a finite number. Hint: correct lr in "
        "{nan_lr_yaml}, or give --lr on the command line (flags win)",
    ),
    (
        "numbers",
        MSUN,
        T,
        ["--config", "{word_lr_yaml}"],
        "{word_lr_yaml}: lr takes float, got 'fast'. Hint: give lr a number, such as 0.1 or 1e-3",
    ),
    ("numbers", MSUN, T, ["--lr", "nan"], "--lr must be a finite number"),
    ("numbers", MSUN, T, ["--lr", "inf"], "--lr must be a finite number"),
    ("numbers", MSUN, T, ["--warmup-epochs", "inf"], "--warmup-epochs must be a finite"),
    ("numbers", MSUN, T, ["--momentum", "-inf"], "--momentum must be a finite"),
    ("numbers", MSUN, T, ["--weight-decay", "nan"], "--weight-decay must be a finite"),
    ("numbers", MSUN, T, ["--lr", "1e300"], "--lr must be > 0 and at most 3.403e+38"),
    ("numbers", MSUN, T, ["--weight-decay", "1e39"], "--weight-decay must be >= 0 and at most"),
    ("numbers", MSUN, T, ["--si-weight", "nan"], "--si-weight must be a finite"),
    ("numbers", MSUN, T, ["--crop-scale-min", "nan"], "--crop-scale-min must be a finite"),
    ("numbers", MSUN, T, ["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
    ("numbers", MSUN, T, ["--seed", "4294967296"], "--seed must be in 0 .. 2**32 - 1"),
    ("numbers", CKA, C, ["--kernel", "rbf", "--sigma-frac", "nan"], "sigma_frac"),
    ("numbers", CKA, C, ["--bootstrap", "10", "--ci", "nan"], "--ci must be a coverage"),
    ("sizes", MSUN, T, ["--eval-sizes", "32,99999"], "each in 1..4096"),
    ("sizes", MSUN, T, ["--eval-sizes", "16,32,16"], "16 listed twice"),
    ("sizes", MSUN, E, ["{run}/last.pt", "--eval-sizes", "16,16"], "16 listed twice"),
    ("sizes", MSUN, F, ["--model", "resnet18", "--eval-sizes", "8:99999:8"], "each in 1..4096"),
    ("sizes", MSUN, T, ["--image-size", "100000"], "--image-size must be in 4..4096, got 100000"),
    ("sizes", MSUN, T, ["--image-size", "3"], "--image-size must be in 4..4096, got 3"),
    ("sizes", MSUN, E, ["{run}/last.pt", "--image-size", "3"], "3 is not in the range 4<=x<=4096"),
    ("sizes", MSUN, E, ["{run}/last.pt", "--image-size", "5000"], "5000 is not in the range 4<="),
    ("sizes", MSUN, T, ["--method", "mst", "--scales", "16", "99999"], "sizes in 1..4096"),
    (
        "sizes",
        MSUN,
        T,
        ["--model", "vgg11", "--method", "vanilla", "--image-size", "28"],
        "vgg11 needs images of at least 32 px (a smaller one shrinks to nothing in its "
        "down-sampling); --image-size is 28. Hint: make --image-size 32 or more",
    ),
    (
        "sizes",
        MSUN,
        T,
        ["--model", "densenet121", "--method", "mst", "--image-size", "28"],
        "densenet121 needs images of at least 29 px",
    ),
    (
        "sizes",
        MSUN,
        T,
        ["--model", "vgg16_bn", "--image-size", "28"],
        "the default --scales at --image-size 28: 4 16 28). Hint: make --image-size 32 or more",
    ),
    (
        "sizes",
        MSUN,
        T,
        ["--model", "vgg11", "--image-size", "64", "--scales", "8", "16", "28"],
        "(--scales 8 16 28). Hint: make the largest of --scales 32 or more",
    ),
    ("numbers", MSUN, T, ["--amp", "fp16", "--device", "cpu"], "Hint: use --amp bf16, or"),
    ("data", MSUN, T, [*tinyrun.TRAIN, "--data", "fashionmnist:{badlabels}"], "label 12"),
    ("data", MSUN, T, ["--data", "{afile}"], "is a file"),
    ("data", MSUN, T, ["--data", "fashionmnist:{afile}"], "names a file"),
    ("data", CKA, C, ["--data", "{afile}"], "is a file"),
    (
        "data",
        MSUN,
        T,
        [*tinyrun.TRAIN, "--data", "fashionmnist:{idx}", "--num-val", "17"],
        "--num-val 17 asks for more validation images than",
    ),
    (
        "data",
        MSUN,
        T,
        [*tinyrun.TRAIN, "--data", "fashionmnist:{idx}", "--num-train", "33"],
        "--num-train 33 asks for more training images than fashionmnist:{idx} holds: 32. "
        "Hint: give --num-train 32 or fewer",
    ),
    ("results", CKA, S, ["--from", "{no_layers}"], "has no valid 'layers_a'"),
    ("results", CKA, S, ["--from", "{nan_result}"], "is NaN in this result"),
    (
        "results",
        MSUN,
        T,
        ["--model", "resnet18", "--split-at", "auto", "--cka-from", "{nan_result}"],
        "is NaN",
    ),
    ("run folders", MSUN, E, ["{run}"], "is a folder, not a checkpoint. Hint: give"),
    ("run folders", MSUN, E, ["{run}/last.pt", "--out", "{eval_out}"], "remove the folder"),
    ("run folders", MSUN, E, ["{run}/last.pt", "--out", "{run}", "--overwrite"], "not an earlier"),
    # root passes os.access everywhere; /proc refuses a new folder all the same
    ("run folders", MSUN, E, ["{run}/last.pt", "--out", "/proc/msuneval"], "not a writable"),
    ("run folders", MSUN, T, [*tinyrun.TRAIN, "--out", "{eval_out}"], "not an msun train run's"),
    ("msun only", MSUN, T, ["--method", "vanilla", "--si-weight", "0.5"], "--si-weight shapes"),
    ("msun only", MSUN, T, ["--method", "mst", "--si-pairs", "largest"], "--si-pairs shapes"),
    ("msun only", MSUN, T, ["--method", "vanilla", "--si-threshold", "0.1"], "--si-threshold"),
    (
        "msun only",
        MSUN,
        T,
        ["--config", "{msun_run_yaml}", "--method", "vanilla"],
        "--split-at layer2 (from {msun_run_yaml}), --si-threshold 0.01 (from {msun_run_yaml}) "
        "shape an MSUN; --method vanilla has no subnets. Hint: give --split-at none "
        "--si-threshold none to unset what {msun_run_yaml} sets",
    ),
    (
        "msun only",
        MSUN,
        T,
        ["--config", "{msun_run_yaml}", "--method", "mst", "--split-at", "none"],
        "--si-threshold 0.01 (from {msun_run_yaml}) shapes MSUN's scale-invariance loss",
    ),
]


@pytest.mark.parametrize(
    ("kind", "tool", "command", "args", "needle"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
def test_hostile_invocations_end_in_one_line(
    kind: str,
    tool: str,
    command: str,
    args: list[str],
    needle: str,
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    offline: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    extra = ["--out", str(tmp_path / "out")] if command == T else []
    if command == C:
        extra = ["--model", "resnet18", "--weights", "none", "--num-images", "8"]
    argv = [command, *extra, *(a.format(**files) for a in args)]
    needle = needle.format(**files)  # a needle may name a file too
    assert_refused(ckascope_main if tool == CKA else msun_main, argv, needle, tmp_path)


def test_every_class_of_the_issue_has_cases() -> None:
    kinds = {case[0] for case in CASES}
    assert kinds == {"config", "numbers", "sizes", "data", "results", "run folders", "msun only"}
    assert len(CASES) >= 30


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_msun_eval_never_replaces_an_earlier_result_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import msun

    torch.manual_seed(0)
    model = msun.build_msun("resnet18", scales=(16, 32), num_classes=10)
    msun.save_checkpoint(model, tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    args = ["eval", "m.pt", "--image-size", "32", "--num-val", "8", "--eval-sizes", "16,32"]
    for _ in range(2):
        result = CliRunner().invoke(msun_main, args)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["msun-eval", "msun-eval-2"]
    again = CliRunner().invoke(msun_main, [*args, "--out", "msun-eval", "--overwrite"])
    assert again.exit_code == 0, again.output


def test_an_image_folder_with_links_back_into_itself_counts_each_image_once(tmp_path: Path) -> None:
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")  # a loop
    os.symlink(tmp_path / "dog", tmp_path / "cat" / "back")  # a link to another class
    os.symlink(tmp_path / "dog" / "0.png", tmp_path / "dog" / "again.png")  # a linked file
    folder = SafeImageFolder(str(tmp_path))
    paths = [p for p, _ in folder.samples]
    assert len(paths) == 6
    assert len({os.path.realpath(p) for p in paths}) == 6
    assert [label for _, label in folder.samples] == [0, 0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- the Python API


def _model() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: ViewOptions(image_size=0), "ViewOptions.image_size"),
        (lambda: ViewOptions(image_size=-5), "ViewOptions.image_size"),
        (lambda: ViewOptions(resize_size=10**6), "ViewOptions.resize_size"),
        (lambda: SweepOptions(gram_dtype="float16"), "SweepOptions.gram_dtype"),  # type: ignore[arg-type]
        (lambda: SweepOptions(weighting="images"), "SweepOptions.weighting"),  # type: ignore[arg-type]
        (lambda: SweepOptions(batch_size=2), "--batch-size must be at least 4"),
        (lambda: SweepOptions(bootstrap=-1), "--bootstrap"),
    ],
)
def test_options_are_refused_at_construction_naming_the_field(make, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=needle.replace("*", r"\*")):
        make()


def test_a_model_or_a_dict_where_the_spec_goes_is_a_type_error() -> None:
    model = _model()
    with pytest.raises(TypeError, match="a must be a SideSpec, got ResNet"):
        compare_sides(model, SideSpec(model))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"sweep must be a SweepOptions, got dict\. Hint"):
        compare_sides(SideSpec(model), SideSpec(model), sweep={"batch_size": 8})  # type: ignore[arg-type]


class _Items(Dataset):  # type: ignore[type-arg]
    def __init__(self, items: list[object]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> object:
        return self.items[i]


def _both_paths(items: list[object]) -> list[object]:
    """The outcome (a matrix, or the error text) of a dataset of these items and of a loader."""
    model, out = _model(), []
    for source in (_Items(items), DataLoader(_Items(items), batch_size=8)):
        options = {"num_images": 16, "batch_size": 8} if isinstance(source, Dataset) else {}
        try:
            r = compare_scales(model, source, (16, 32), image_size=32, layers="stages", **options)
            out.append(np.round(r.matrix, 10))
        except InputError as e:
            out.append(str(e).split(", got ")[-1])  # what was refused, and the hint
    return out


def test_datasets_and_loaders_take_the_same_items_the_same_way() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=g)
    pairs = _both_paths([(images[i], i % 4) for i in range(16)])
    triples = _both_paths([(images[i], i % 4, "extra") for i in range(16)])  # extra: ignored
    np.testing.assert_array_equal(triples[0], pairs[0])  # the dataset path
    np.testing.assert_array_equal(triples[1], pairs[1])  # the loader path
    dicts = _both_paths([{"image": images[i], "label": 0} for i in range(16)])
    assert dicts[0] == dicts[1]  # the same refusal, with the same hint
    assert str(dicts[0]).startswith("a dict with keys ['image', 'label']. Hint: wrap")
    uint8 = _both_paths([((images[i] * 40).to(torch.uint8), 0) for i in range(16)])
    assert uint8[0] == uint8[1]
    assert "torch.uint8, not float" in str(uint8[0])


def test_grayscale_batches_become_rgb_for_an_rgb_model_on_both_paths() -> None:
    g = torch.Generator().manual_seed(1)
    gray = torch.rand(16, 1, 32, 32, generator=g)
    model = _model()
    loader = DataLoader(TensorDataset(gray, torch.zeros(16)), batch_size=8)
    from_loader = compare_scales(model, loader, (16, 32), image_size=32, layers="stages")
    rgb = DataLoader(TensorDataset(gray.expand(-1, 3, -1, -1), torch.zeros(16)), batch_size=8)
    from_rgb = compare_scales(model, rgb, (16, 32), image_size=32, layers="stages")
    np.testing.assert_allclose(from_loader.matrix, from_rgb.matrix, rtol=0, atol=1e-12)
