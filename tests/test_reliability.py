"""Guarantees across the whole command line: wrong invocations, interruptions, hostile files.

Every wrong invocation must exit non-zero with exactly one line on stderr that names the problem,
print no traceback, and leave no new file behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ckascope.cli import main as ckascope_main
from ckascope.data import SafeImageFolder, Skipped, eval_transform
from ckascope.result import CKAResult
from msun.cli import main as msun_main
from tests import tinyrun
from tests.refusals import assert_refused

ROOT = Path(__file__).resolve().parents[1]
TINY_COMPARE = [
    "--weights",
    "none",
    "--num-classes",
    "10",
    "--image-size",
    "32",
    "--resize-size",
    "37",
    "--batch-size",
    "8",
    "--num-images",
    "16",
    "--layers",
    "stages",
]
TINY_TRAIN = tinyrun.TRAIN


class Evil:
    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, ("echo pwned",))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Bad and good inputs the table points at."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04not a checkpoint")
    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    (tmp_path / "unknown.yaml").write_text("modle: resnet18\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    two = CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"mode": "models", "model": "resnet18"})
    two.save(tmp_path / "two_models")
    other = CKAResult(
        np.eye(2),
        ["features.0", "features.1"],
        ["features.0", "features.1"],
        {"mode": "scales", "model": "efficientnet_b0"},
    )
    other.save(tmp_path / "unsupported")
    names = (
        "empty",
        "afile",
        "foreign",
        "corrupt.pt",
        "evil.pt",
        "bad.yaml",
        "unknown.yaml",
        "list.yaml",
        "two_models",
        "unsupported",
    )
    return {name.replace(".pt", "").replace(".", "_"): tmp_path / name for name in names}


C, S, F, T, E = "compare", "suggest-split", "flops", "train", "eval"
# (tool, command, arguments, words the one-line message must contain); {name} is a path in ``files``.
CASES: list[tuple[str, str, list[str], str]] = [
    ("ckascope", C, ["--model", "resnet5O"], "did you mean 'resnet50'"),
    ("ckascope", C, ["--model", "resnet18", "--scales", "0", "224"], "--scales"),
    ("ckascope", C, ["--model", "resnet18", "--scales", "32", "99999"], "--scales"),
    ("ckascope", C, ["--model", "resnet18", "--scales", "a", "b"], "--scales"),
    ("ckascope", C, ["--model", "resnet18", "--batch-size", "2"], "at least 4"),
    ("ckascope", C, ["--model", "resnet18", "--batch-size", "many"], "--batch-size"),
    ("ckascope", C, ["--model", "resnet18", "--num-images", "0"], "--num-images"),
    ("ckascope", C, ["--model", "resnet18", "--repeats", "0"], "--repeats"),
    ("ckascope", C, ["--model", "resnet18", "--kernel", "cosine"], "--kernel"),
    ("ckascope", C, ["--model", "resnet18", "--bootstrap", "-1"], "--bootstrap"),
    ("ckascope", C, ["--model", "resnet18", "--permutations", "many"], "--permutations"),
    (
        "ckascope",
        C,
        ["-m", "resnet18", "--bootstrap", "9", "--ci", "nan"],
        "--ci must be a coverage",
    ),
    ("ckascope", C, ["--model", "resnet18", "--ci", "1.5"], "--ci"),
    ("ckascope", C, ["--model", "resnet18", "--kernel", "rbf", "--sigma-frac", "0"], "sigma_frac"),
    ("ckascope", C, ["--model", "resnet18", "--protocol", "crop"], "--protocol"),
    ("ckascope", C, ["--model", "resnet18", "--layers", "layer9"], "unknown layer"),
    ("ckascope", C, ["--model", "resnet18", "--layers", "block*"], "matches no module"),
    ("ckascope", C, ["--model", "resnet18", "--data", "/no/such/dir"], "does not exist"),
    ("ckascope", C, ["--model", "resnet18", "--data", "cifar1O:/tmp"], "did you mean 'cifar10'"),
    ("ckascope", C, ["--model", "resnet18", "--data", "mnist:{empty}"], "no usable mnist"),
    ("ckascope", C, ["--model", "resnet18", "--data", "{empty}"], "no images found"),
    ("ckascope", C, ["--model", "resnet18", "--device", "tpu9"], "unknown device"),
    (
        "ckascope",
        C,
        ["--model", "resnet18", "--model-b", "resnet34", "--scales", "32", "224"],
        "--scale S",
    ),
    (
        "ckascope",
        C,
        ["--model", "resnet18", "--checkpoint", "{empty}/missing.pt"],
        "does not exist",
    ),
    (
        "ckascope",
        C,
        ["--model", "resnet18", "--checkpoint", "{corrupt}"],
        "not a readable checkpoint",
    ),
    ("ckascope", C, ["--model", "resnet18", "--checkpoint", "{evil}"], "refusing to load"),
    ("ckascope", C, ["--model", "resnet18", "--out", "{foreign}"], "remove the folder yourself"),
    ("ckascope", C, ["--model", "resnet18", "--out", "{afile}"], "is a file"),
    ("ckascope", C, ["--model", "resnet18", "--out", "{afile}/sub"], "not a writable folder"),
    ("ckascope", C, ["--model", "resnet18", "--weights", "IMAGENET1K_V9"], "weights for resnet18"),
    ("ckascope", C, ["--model", "resnet18", "--num-classes", "1"], "--num-classes"),
    ("ckascope", C, ["--model", "resnet18", "--resize-size", "2"], "--resize-size"),
    ("ckascope", C, [], "no model given"),
    ("ckascope", C, ["--model", "resnet18", "--kernel", "rbf", "--sigma-frac", "inf"], "finite"),
    ("ckascope", C, ["--model", "vit_b_16", "--protocol", "native"], "--protocol upsample"),
    (
        "ckascope",
        C,
        [
            "-m",
            "resnet18",
            "--model-b",
            "resnet34",
            "--weights-b",
            "default",
            "--num-classes",
            "1000",
        ],
        "--weights-b none",
    ),
    ("ckascope", C, ["--model", "resnet18", "--data", "mnist"], "mnist:DIR"),
    ("ckascope", S, ["--from", "{empty}"], "no result.json"),
    ("ckascope", S, ["--from", "{two_models}"], "no same-layer"),
    ("ckascope", S, ["--from", "{two_models}", "--threshold", "1.5"], "--threshold"),
    ("ckascope", S, ["--from", "{unsupported}"], "efficientnet_b0"),
    ("msun", F, ["--model", "resnet5O"], "resnet50"),
    ("msun", F, ["--model", "resnet50", "--split-at", "layer9"], "layer2"),
    ("msun", F, ["--model", "resnet50", "--scales", "224", "32"], "increasing"),
    ("msun", F, ["--model", "resnet50", "--num-classes", "1"], "--num-classes"),
    ("msun", F, [], "--model"),
    ("msun", T, [*TINY_TRAIN, "--method", "distill"], "--method"),
    ("msun", T, [*TINY_TRAIN, "--data", "/no/such/dir"], "does not exist"),
    ("msun", T, [*TINY_TRAIN, "--batch-size", "1"], "at least 2 images"),
    ("msun", T, [*TINY_TRAIN, "--config", "{empty}/missing.yaml"], "does not exist. Hint:"),
    ("msun", T, [*TINY_TRAIN, "--config", "{bad_yaml}"], "not valid YAML"),
    ("msun", T, [*TINY_TRAIN, "--config", "{unknown_yaml}"], "did you mean 'model'"),
    ("msun", T, [*TINY_TRAIN, "--config", "{list_yaml}"], "mapping"),
    ("msun", T, [*TINY_TRAIN, "--resume"], "does not exist"),
    ("msun", T, [*TINY_TRAIN, "--linear-probe"], "--init-from"),
    ("msun", T, [*TINY_TRAIN, "--init-from", "{corrupt}"], "not a readable checkpoint"),
    ("msun", T, [*TINY_TRAIN, "--lr", "-1"], "--lr"),
    ("msun", T, [*TINY_TRAIN, "--epochs", "0"], "--epochs"),
    ("msun", T, [*TINY_TRAIN, "--out", "{afile}"], "is a file"),
    ("msun", T, [*TINY_TRAIN, "--method", "mst", "--split-at", "layer2"], "no subnets"),
    ("msun", T, [*TINY_TRAIN, "--model", "efficientnet_b0"], "efficientnet_b0"),
    ("msun", E, ["{empty}/missing.pt"], "does not exist"),
    ("msun", E, ["{corrupt}"], "not a readable checkpoint"),
    ("msun", E, ["{evil}"], "refusing to load"),
    ("msun", E, [], "CHECKPOINTS"),
]


@pytest.mark.parametrize(
    ("tool", "command", "args", "needle"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)]
)
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_wrong_invocations(
    tool: str,
    command: str,
    args: list[str],
    needle: str,
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    offline: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # default output folders would land here
    defaults = TINY_COMPARE if (tool, command) == ("ckascope", C) else []
    if "--checkpoint" in args:  # its weights set the classes: --num-classes would be refused
        at = defaults.index("--num-classes")
        defaults = [*defaults[:at], *defaults[at + 2 :]]
    if (tool, command) == ("msun", T):
        defaults = ["--out", str(tmp_path / "run")]
    argv = [command, *defaults, *(a.format(**files) for a in args)]  # the case's options win
    assert_refused(ckascope_main if tool == "ckascope" else msun_main, argv, needle, tmp_path)


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_killed_compare_leaves_no_partial_result_and_a_rerun_succeeds(
    tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "res"
    cmd = [
        sys.executable,
        "-m",
        "ckascope",
        "compare",
        "--model",
        "resnet18",
        *TINY_COMPARE[:-4],
        "--num-images",
        "64",
        "--batch-size",
        "8",
        "--out",
        str(out),
    ]
    for delay in (0.5, 3.0, 6.0):  # early (imports), mid-sweep, late (possibly while saving)
        proc = subprocess.Popen(
            cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # it finished first: a complete result, which is fine too
        assert "Traceback" not in err
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "res"]
        assert all(
            name.startswith(".res.") for name in leftovers
        )  # only hidden staging of a SIGKILL
        if out.exists():
            CKAResult.load(out)  # complete, never partial
    done = subprocess.run(
        [*cmd, "--overwrite"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert CKAResult.load(out).settings["images_used"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]  # the rerun removed any staging


def test_broken_images_are_skipped_counted_and_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / "gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(
        root / "cmyk.jpg"
    )
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / "deep.png")
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(root / "huge.png")
    (root / "zero.jpg").write_bytes(b"")
    good = (root / "rgb.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 3])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 is a "decompression bomb" now
    ds = SafeImageFolder(str(tmp_path / "imgs"), transform=eval_transform(16, 16))
    items = {Path(ds.samples[i][0]).name: ds[i] for i in range(len(ds))}
    skipped = sorted(name for name, item in items.items() if isinstance(item, Skipped))
    assert skipped == ["huge.png", "truncated.png", "zero.jpg"]
    for name in ("rgb.png", "gray.png", "cmyk.jpg", "deep.png"):
        assert items[name][0].shape == (3, 16, 16)


def test_half_precision_and_tuple_output_models_compare(tmp_path: Path) -> None:
    from ckascope.compare import compare_scales
    from ckascope.models import build_model

    data = torch.utils.data.TensorDataset(
        torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    )
    model = build_model("resnet18", "none", num_classes=10).to(torch.bfloat16)
    view = torch.utils.data.TensorDataset(data.tensors[0].to(torch.bfloat16), data.tensors[1])
    result = compare_scales(model, view, (16, 32), layers="stages", image_size=32, batch_size=8)
    assert np.isfinite(result.matrix).all()

    class TupleNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torchvision.models.resnet18(num_classes=4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            out = self.body(x)
            return out, {"logits": out}

    tuple_result = compare_scales(
        TupleNet(), data, (16, 32), layers=["body.layer1", "body.fc"], image_size=32, batch_size=8
    )
    assert tuple_result.layers_a == ["body.layer1", "body.fc"]
