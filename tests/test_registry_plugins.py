"""The one registry helper: unknown names, duplicates, and outside packages that add a method,
a family or an LLM-side patch through an entry point and so reach every command.

The outside package is written into a temporary folder: a module and a ``.dist-info`` with
``entry_points.txt``, found by ``importlib.metadata`` on ``sys.path``, as an installed wheel
would be. Each check runs in a fresh interpreter, where the registries load from scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prumerge.errors import PrumergeError
from prumerge.registry import DuplicateNameError, Registry, UnknownNameError

SRC = Path(__file__).resolve().parents[1] / "src"

PLUGIN = '''
import torch

from prumerge.methods import VisionMethod, register_method
from prumerge.ops import budget_count, kept_reduction


@register_method("firstk")
class FirstK(VisionMethod):
    """Keeps the first k patches (a test plugin)."""

    def __init__(self, keep: int | float = 4) -> None:
        self.keep = keep

    def reduce(self, inputs):
        batch, n, _ = inputs.features.shape
        k = budget_count(self.budget_for(inputs), n)
        selected = torch.zeros(batch, n, dtype=torch.bool)  # (B, N)
        selected[:, :k] = True
        return kept_reduction(inputs.features, selected, inputs.features)
'''

FAMILY = """
from prumerge.adapters.llava import LlavaAdapter


class ToyAdapter(LlavaAdapter):
    family = "toy"
    title = "Toy-VL"
    model_classes = ("ToyForConditionalGeneration",)
"""


def _install(root: Path, entry_points: str, modules: dict[str, str]) -> None:
    """A tiny package installed into ``root``, as a wheel installs one (no network)."""
    package = root / "prumerge_toy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, text in modules.items():
        (package / f"{name}.py").write_text(textwrap.dedent(text))
    info = root / "prumerge_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prumerge-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (info / "RECORD").write_text("")


def _python(root: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(SRC)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_outside_method_and_family_reach_every_command(tmp_path: Path) -> None:
    _install(
        tmp_path,
        """
        [prumerge.methods]
        firstk = prumerge_toy.method

        [prumerge.families]
        toy = prumerge_toy.family:ToyAdapter
        """,
        {"method": PLUGIN, "family": FAMILY},
    )
    done = _python(
        tmp_path,
        """
        import json
        from prumerge.adapters import FAMILIES, supported_models
        from prumerge.bench import parse_configs
        from prumerge.commands.eval import plan_configs
        from prumerge.methods import method_names
        from prumerge.methods.spec import parse_spec
        from prumerge.serve.config import parse_serve_config
        from prumerge.train.mixture import parse_mixture

        print(json.dumps({
            "methods": method_names(),
            "spec": parse_spec("firstk@3").label,
            "bench": [c.label for c in parse_configs("firstk@2")],
            "eval": [c.label for c in plan_configs("firstk", "5", None)],
            "train": [e.label for e in parse_mixture("firstk@0.5:1")],
            "serve": parse_serve_config({"method": "firstk", "keep": 6}).label,
            "families": list(FAMILIES),
            "supported": supported_models(),
            "toy_name": FAMILIES["toy"].__name__,
        }))
        """,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "firstk" in seen["methods"]
    assert seen["spec"] == "firstk@3" and seen["bench"] == ["none", "firstk@2"]
    assert seen["eval"] == ["firstk@5"] and seen["train"] == ["firstk@0.5"]
    assert seen["serve"] == "firstk@6"
    assert seen["families"][-1] == "toy" and seen["toy_name"] == "ToyAdapter"
    assert "ToyForConditionalGeneration (Toy-VL)" in seen["supported"]

    # the CLI lists it and `ask` checks it like a built-in, before any model loads
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SRC)])}
    listed = subprocess.run(
        [sys.executable, "-m", "prumerge", "methods"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0 and "firstk: Keeps the first k patches" in listed.stdout


def test_a_duplicate_or_broken_plugin_is_refused_with_a_warning(tmp_path: Path) -> None:
    _install(
        tmp_path,
        """
        [prumerge.methods]
        pool = prumerge_toy.family:ToyAdapter
        broken = prumerge_toy.nosuchmodule
        """,
        {"family": FAMILY},
    )
    done = _python(
        tmp_path,
        """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from prumerge.methods import METHODS
            names = list(METHODS)
        print(METHODS["pool"].__module__)
        for w in caught:
            print("WARN", w.message)
        """,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "prumerge.methods.zoo"  # the built-in is kept, not overwritten
    warned = "\n".join(lines[1:])
    assert "entry point 'pool' ignored: method 'pool' is registered twice" in warned
    assert "entry point 'broken' could not be loaded" in warned


def test_one_error_class_for_unknown_names_and_duplicates() -> None:
    from prumerge.adapters import FAMILIES
    from prumerge.adapters.llm import LANGUAGE_PATCHES
    from prumerge.methods import METHODS, build_method, method_names

    for registry, name in [(METHODS, "nosuch"), (FAMILIES, "nosuch"), (LANGUAGE_PATCHES, "x")]:
        with pytest.raises(UnknownNameError) as info:
            registry["x" if registry is LANGUAGE_PATCHES else name]
        assert str(info.value).startswith(f"unknown {registry.kind} ")
        assert "; available: " in str(info.value)
        assert isinstance(info.value, PrumergeError)  # the CLI shows it as one line
    with pytest.raises(UnknownNameError) as info:
        build_method("nosuch")
    assert str(info.value) == "unknown method 'nosuch'; available: " + ", ".join(
        sorted(method_names())
    )

    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(DuplicateNameError, match="thing 'a' is registered twice"):
        registry.register("a")(2)
    assert registry["a"] == 1 and list(registry) == ["a"]
    with pytest.raises(DuplicateNameError):
        METHODS.add("pool", METHODS["pool"])
    with pytest.raises(DuplicateNameError):
        FAMILIES.add("llava", FAMILIES["llava"])
