"""What an output folder may replace: ``--overwrite`` replaces an earlier result, nothing else.

A folder holding anything but an earlier ckascope result (an msun training run, a user's files)
survives ``--overwrite`` untouched, from the command line and from Python; the working folder
and the folders above it are refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ckascope.cli import main
from ckascope.errors import InputError
from ckascope.result import CKAResult
from tests.ckascope.test_cli_compare import SMALL
from tests.folders import contents, own_files, training_run

#: A comparison that fails once it starts (the model has no such layer): refusing the folder
#: instead proves the folder was checked before any work.
DOOMED = ["compare", "--model", "resnet18", *SMALL, "--layers", "nosuch"]

MAKERS = [pytest.param(training_run, id="msun-run"), pytest.param(own_files, id="own-files")]


def _result(run: int = 1) -> CKAResult:
    return CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"run": run})


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("overwrite", [False, True])
def test_save_never_replaces_a_folder_of_other_files(
    tmp_path: Path, make: Callable[[Path], Path], overwrite: bool
) -> None:
    folder = make(tmp_path / "mine")
    before = contents(folder)
    with pytest.raises(InputError, match="not an earlier ckascope result") as refused:
        _result().save(folder, overwrite=overwrite)
    assert "pass --overwrite" not in str(refused.value)
    assert "remove the folder yourself" in str(refused.value)
    assert contents(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging left beside it


def test_save_replaces_an_earlier_result_only_with_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "res"
    _result(1).save(dest)
    with pytest.raises(InputError, match=r"overwrite=True from Python"):
        _result(2).save(dest)
    assert CKAResult.load(dest).settings == {"run": 1}
    _result(2).save(dest, overwrite=True)
    assert CKAResult.load(dest).settings == {"run": 2}


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_compare_leaves_a_folder_of_other_files_untouched(
    tmp_path: Path, make: Callable[[Path], Path], overwrite: list[str]
) -> None:
    folder = make(tmp_path / "vancopy")
    before = contents(folder)
    done = CliRunner().invoke(main, [*DOOMED, "--out", str(folder), *overwrite])
    assert done.exit_code == 2, done.output
    [line] = done.stderr.strip().splitlines()
    assert "not an earlier ckascope result (" in line  # naming the first of them
    assert "Hint: choose another --out, or empty or remove the folder yourself" in line
    assert "pass --overwrite" not in line
    assert ("--overwrite never replaces" in line) == bool(overwrite)
    assert contents(folder) == before


@pytest.mark.parametrize(
    ("where", "out"), [("result", "."), ("result", "{cwd}"), ("result/sub", "..")]
)
def test_compare_refuses_the_working_folder_and_above_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, out: str
) -> None:
    """Even holding an earlier result, which --overwrite may replace elsewhere."""
    result = tmp_path / "result"
    _result().save(result)
    (result / "sub").mkdir()
    before = contents(result)
    cwd = tmp_path / where
    monkeypatch.chdir(cwd)
    done = CliRunner().invoke(main, [*DOOMED, "--out", out.format(cwd=cwd), "--overwrite"])
    assert done.exit_code == 2, done.output
    [line] = done.stderr.strip().splitlines()
    assert "is the current folder or one above it" in line
    assert contents(result) == before


def test_save_refuses_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="current folder or one above it"):
        _result().save(".", overwrite=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", ["notes.txt", "sub"])
def test_overwrite_keeps_a_result_folder_that_also_holds_a_users_files(
    tmp_path: Path, extra: str
) -> None:
    """A result with a file (or folder) of the user's added is not a result alone: kept whole."""
    dest = tmp_path / "res"
    _result(1).save(dest)
    (dest / extra).mkdir() if extra == "sub" else (dest / extra).write_text("mine")
    before = contents(dest)
    with pytest.raises(InputError, match=rf"not an earlier ckascope result \({extra}\)"):
        _result(2).save(dest, overwrite=True)
    assert contents(dest) == before


def test_every_figure_compare_draws_belongs_to_a_result_folder() -> None:
    from ckascope.plot import figure_names
    from ckascope.result import RESULT_FILES

    square = CKAResult(np.eye(2), ["a", "b"], ["a", "b"], {"scales": [8, 16]})
    assert square.has_diagonal
    assert set(figure_names(square)) <= RESULT_FILES


def test_a_symbolic_link_as_out_is_refused_naming_its_target(tmp_path: Path) -> None:
    """Replacing it would swap the link for a folder and leave the target as it was."""
    target = tmp_path / "base"
    _result(1).save(target)
    link = tmp_path / "linkbase"
    link.symlink_to(target)
    with pytest.raises(InputError, match=r"is a symbolic link\. Hint: give the folder it points"):
        _result(2).save(link, overwrite=True)
    assert link.is_symlink()
    assert CKAResult.load(target).settings == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "linkbase"]


def test_a_folder_of_other_files_as_a_result_is_pointed_to_the_folder_compare_wrote(
    tmp_path: Path,
) -> None:
    with pytest.raises(InputError, match="give the folder ckascope compare --out wrote"):
        CKAResult.load(training_run(tmp_path / "run"))
    with pytest.raises(InputError, match="run ckascope compare --out"):
        CKAResult.load(tmp_path / "missing")
