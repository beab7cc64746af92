"""``ckascope plot``: a saved result's figures drawn again from its numbers alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ckascope.cli import main
from ckascope.result import CKAResult
from tests.folders import contents, training_run

FIGURES = ["curve.pdf", "curve.png", "heatmap.pdf", "heatmap.png"]


def _saved(folder: Path, mode: str = "scales") -> Path:
    """A result saved without figures (as ``compare --no-figures`` leaves it)."""
    layers = ["stem", "l1", "l2", "l3"]
    matrices = np.random.default_rng(0).uniform(0, 1, (2, 4, 4))
    settings = {"mode": mode, "scales": [32, 224], "model": "toy", "kernel": "linear"}
    return CKAResult(matrices, layers, layers, settings).save(folder)


def _assert_figures(folder: Path, names: list[str]) -> None:
    """Each figure is a real PNG or PDF with something drawn in it."""
    for name in names:
        data = (folder / name).read_bytes()
        assert len(data) > 5000, name
        assert data.startswith(b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"%PDF"), name
    for name in (n for n in names if n.endswith(".png")):
        with Image.open(folder / name) as img:
            assert min(img.size) > 300
            assert len(np.unique(np.asarray(img.convert("L")))) > 10  # not a blank canvas


def test_plot_draws_the_figures_into_the_result_folder(tmp_path: Path) -> None:
    result = _saved(tmp_path / "res")
    before = contents(result)
    done = CliRunner().invoke(main, ["plot", str(result)])
    assert done.exit_code == 0, done.output
    assert f"figures written to {result}/" in done.stdout
    assert sorted(p.name for p in result.iterdir()) == sorted([*before, *FIGURES])
    _assert_figures(result, FIGURES)
    assert {k: v for k, v in contents(result).items() if k in before} == before
    assert CKAResult.load(result).repeats == 2  # still a result, figures and all


def test_plot_never_replaces_figures_without_overwrite(tmp_path: Path) -> None:
    result = _saved(tmp_path / "res")
    assert CliRunner().invoke(main, ["plot", str(result)]).exit_code == 0
    drawn = contents(result)
    again = CliRunner().invoke(main, ["plot", str(result), "--annotate"])
    assert again.exit_code == 2
    [line] = again.stderr.strip().splitlines()
    assert "already holds heatmap.png, heatmap.pdf, curve.png, curve.pdf" in line
    assert "Hint: pass --overwrite" in line
    assert contents(result) == drawn
    annotated = CliRunner().invoke(main, ["plot", str(result), "--annotate", "--overwrite"])
    assert annotated.exit_code == 0, annotated.output
    assert (result / "heatmap.png").read_bytes() != drawn["heatmap.png"]  # the values printed
    _assert_figures(result, FIGURES)


def test_plot_out_makes_the_folder_and_a_two_model_result_gets_a_heatmap(tmp_path: Path) -> None:
    result = _saved(tmp_path / "res", mode="models")
    before = contents(result)
    out = tmp_path / "slides" / "cka"
    done = CliRunner().invoke(main, ["plot", str(result), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.pdf", "heatmap.png"]
    _assert_figures(out, ["heatmap.pdf", "heatmap.png"])
    assert contents(result) == before


@pytest.mark.parametrize("make", [training_run, Path.mkdir], ids=["msun-run", "empty"])
def test_plot_refuses_a_folder_that_holds_no_result(
    tmp_path: Path, make: Callable[[Path], object]
) -> None:
    folder = tmp_path / "run"
    make(folder)
    before = contents(tmp_path)
    done = CliRunner().invoke(main, ["plot", str(folder)])
    assert done.exit_code == 2
    [line] = done.stderr.strip().splitlines()
    assert "holds no ckascope result (no result.json)" in line
    assert "Hint: give a folder ckascope compare wrote" in line
    assert contents(tmp_path) == before


def test_plot_refuses_a_missing_folder(tmp_path: Path) -> None:
    done = CliRunner().invoke(main, ["plot", str(tmp_path / "nothere")])
    assert done.exit_code == 2
    assert "does not exist" in done.stderr


def test_plot_refuses_an_out_holding_another_result(tmp_path: Path) -> None:
    """B saved without figures would otherwise get A's figures beside B's numbers."""
    a, b = _saved(tmp_path / "a"), _saved(tmp_path / "b")
    before = contents(b)
    done = CliRunner().invoke(main, ["plot", str(a), "--out", str(b), "--overwrite"])
    assert done.exit_code == 2, done.output
    assert f"--out {b} holds another ckascope result" in done.stderr
    assert contents(b) == before
    again = CliRunner().invoke(main, ["plot", str(a), "--out", str(a)])  # itself: fine
    assert again.exit_code == 0, again.output


def test_a_killed_redraws_staging_does_not_keep_the_result_from_being_replaced(
    tmp_path: Path,
) -> None:
    res = _saved(tmp_path / "res")
    (res / ".figures.k1ll3d.tmp").mkdir()  # what a redraw killed while drawing leaves
    (res / ".figures.k1ll3d.tmp" / "heatmap.png").write_bytes(b"half")
    CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"run": 2}).save(res, overwrite=True)
    assert sorted(p.name for p in res.iterdir()) == ["cka.csv", "matrices.npz", "result.json"]
