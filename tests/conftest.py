"""Suite-wide settings and fixtures.

The tests use tiny models, for which one torch thread is fastest: two threads per process buy
nothing at these sizes and, on a shared 2-core machine, make every op wait for a core; with
one, the suite runs several times faster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by subprocesses the tests start
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model(default_model_cache: Path):
    """`(model, processor)` of the shipped default model, loaded once per session from
    `default_model_cache`, the same entry the end-to-end CLI tests use (built once)."""
    pytest.importorskip("transformers")
    from prumerge.models.default import DEFAULT_RESOLUTION, shipped_projector_path

    if not shipped_projector_path(DEFAULT_RESOLUTION).is_file():
        pytest.skip("no trained projector ships yet")
    from prumerge.models import load_default_model

    return load_default_model(cache_dir=default_model_cache)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA checkpoint directory (model, tokenizer, processor)."""
    from tests.eval.tiny_model import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def one_thread():
    """Run torch on one thread: the tiny model is latency-bound, and on a shared machine
    extra threads only wait for each other. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def default_model_cache(request: pytest.FixtureRequest) -> Path:
    """Where the default model is built once (1-2 min) and then reused across sessions."""
    if os.environ.get("PRUMERGE_CACHE"):
        return Path(os.environ["PRUMERGE_CACHE"])
    return Path(request.config.cache.mkdir("prumerge-default-model"))


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random checkpoint of every family ``scripts/tiny_checkpoints.py`` writes, by
    family name, written once per session by that script."""
    from tests.scripts import load_script

    script = load_script("tiny_checkpoints")
    return script.write_all(tmp_path_factory.mktemp("tiny-families"))
