"""Loading a file of `scripts/` or `benchmarks/` (not packages) as a module, for its tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
BENCHMARKS = SCRIPTS.parent / "benchmarks"


def load_script(name: str, folder: Path = SCRIPTS) -> ModuleType:
    """Import ``<folder>/<name>.py`` (default ``scripts/``) under the module name ``name``."""
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
