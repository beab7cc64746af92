"""Loads the scripts of figures/ (not a package) as modules, for their tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FIGURES = Path(__file__).resolve().parent.parent / "figures"


def load_figure_script(name: str) -> ModuleType:
    """figures/<name>.py as the module ``name`` (registered, so pickling and imports see it)."""
    spec = importlib.util.spec_from_file_location(name, FIGURES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
