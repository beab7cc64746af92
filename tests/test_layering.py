"""The layers of docs/design.md ("The platform"), checked the way large codebases check theirs.

msun reaches ckascope only through ``ckascope.platform``, and only for the names it declares;
ckascope never imports msun. The import rules read the source (``ast``), so an import inside a
function or under ``TYPE_CHECKING`` counts as much as one at the top of a file, and a failure
names the file and line.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckascope.platform as platform

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "ckascope.platform"


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(f"{package}.")


def _imports(tree: ast.AST) -> Iterator[tuple[int, str, list[str]]]:
    """Every (line, module, names) a module imports: statements and string-named dynamic imports.

    ``import a.b`` gives names ``[]``; ``from a.b import c, d`` gives ``["c", "d"]``.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Call) and _called(node) in ("__import__", "import_module"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value, []


def _called(call: ast.Call) -> str | None:
    """The name a call is made through: ``f`` of ``f(...)`` and of ``m.f(...)``."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else None


def platform_violations(source: str, where: str) -> list[str]:
    """What in ``source`` (a module of a package built on ckascope) goes around the platform."""
    found = []
    for line, module, names in _imports(ast.parse(source)):
        if not _under(module, "ckascope"):
            continue
        if module != PLATFORM:
            found.append(f"{where}:{line}: imports {module} (use {PLATFORM})")
        for name in names:
            if name not in platform.__all__:
                found.append(f"{where}:{line}: {name} is not on {PLATFORM} (its __all__)")
    return found


def _sources(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no source files under {ROOT / package}"
    return files


def _isort_order(name: str) -> tuple[int, str]:
    """ruff's RUF022 order (lint enforces it too): CONSTANTS, then Classes, then the rest."""
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_msun_reaches_ckascope_only_through_the_platform() -> None:
    found = [
        v
        for path in _sources("msun")
        for v in platform_violations(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "import ckascope",
        "import ckascope.data",
        "import ckascope.data as d",
        "from ckascope import plugins",
        "from ckascope.data import build_dataset",
        "from ckascope.platform import ScaleView",  # a library name, not a platform one
        "from ckascope.platform import *",
        "def f():\n    from ckascope.views import resize",
        "if TYPE_CHECKING:\n    from ckascope.vocab import Protocol",
        "importlib.import_module('ckascope.models')",
        "__import__('ckascope.models')",
    ],
)
def test_the_platform_rule_catches_every_way_around(source: str) -> None:
    # The rule is only as good as what it sees: each way around the platform must be named.
    assert platform_violations(source, "m.py")


def test_the_platform_rule_lets_the_platform_through() -> None:
    source = (
        "import ckascope.platform\n"
        "from ckascope.platform import InputError, resize as resize_images\n"
        "from ckascopex import thing\n"  # another package whose name merely starts alike
    )
    assert platform_violations(source, "m.py") == []


def test_ckascope_names_no_msun_module() -> None:
    """The other direction in the source, imports inside functions included."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in _sources("ckascope")
        for line, module, _ in _imports(ast.parse(path.read_text()))
        if _under(module, "msun")
    ]
    assert not found, "\n".join(found)


@pytest.mark.slow  # takes seconds or more (the fast subset leaves it out)
def test_ckascope_never_imports_msun() -> None:
    """The dependency arrow (docs/design.md): msun uses ckascope, ckascope names no msun module."""
    check = (
        "import importlib, pkgutil, sys, ckascope; "
        "[importlib.import_module(m.name) for m in pkgutil.iter_modules(ckascope.__path__, 'ckascope.') "
        "if m.name not in ('ckascope.__main__',)]; "
        "loaded = [m for m in sys.modules if m == 'msun' or m.startswith('msun.')]; "
        "assert not loaded, loaded"
    )
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


def test_platform_all_is_sorted_and_complete() -> None:
    names = platform.__all__
    assert names == sorted(set(names), key=_isort_order)
    assert set(names) == set(platform._EXPORTS)


def test_every_platform_name_is_its_home_modules_object() -> None:
    for name, home in platform._EXPORTS.items():
        assert getattr(platform, name) is getattr(importlib.import_module(home), name), name
    with pytest.raises(AttributeError, match="no attribute 'ScaleView'"):
        platform.ScaleView  # noqa: B018 - the attribute access is the test


def test_the_type_checker_sees_what_the_platform_hands_out() -> None:
    """The ``TYPE_CHECKING`` imports (what mypy reads) name each export from its home module."""
    tree = ast.parse(Path(platform.__file__).read_text())
    [block] = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    seen = {
        alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == platform._EXPORTS


def test_every_platform_name_is_documented() -> None:
    doc = platform.__doc__ or ""
    assert [name for name in platform.__all__ if f"``{name}``" not in doc] == []


def _table_rows() -> dict[str, tuple[list[str], str]]:
    """docs/design.md's table of the platform: group -> (its names, "yes"/"no": torch on import)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    table = text.split("| group | names | torch on import |\n")[1].split("\n\n")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines()[1:]]  # past the rule
    return {g.strip(): (re.findall(r"`([^`]+)`", names), torch.strip()) for g, names, torch in rows}


def _export_groups() -> dict[str, list[str]]:
    """The groups of the platform's export table, by its comments: group -> its names."""
    groups: dict[str, list[str]] = {}
    source = Path(platform.__file__).read_text(encoding="utf-8")
    body = source.split("_EXPORTS = {\n")[1].split("\n}\n")[0]
    for line in body.splitlines():
        if line.strip().startswith("# "):
            group = groups.setdefault(line.strip()[2:], [])
        else:
            group.append(line.split('"')[1])
    return groups


def test_the_design_documents_table_is_the_platform() -> None:
    """docs/design.md lists every platform name in its group, and no other; the groups it says
    import no torch do not."""
    rows = _table_rows()
    groups = {g: sorted(names) for g, names in _export_groups().items()}
    assert {g: sorted(names) for g, (names, _) in rows.items()} == groups
    light = sorted(
        {platform._EXPORTS[n] for names, torch in rows.values() if torch == "no" for n in names}
    )
    check = f"import sys; import {', '.join(light)}; assert 'torch' not in sys.modules, sys.modules"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
