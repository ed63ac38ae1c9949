"""The embedded default model (DINOv2-S/14 + SmolLM2-135M-Instruct LLaVA) and its training."""

from prumerge.models.default import (
    DEFAULT_RESOLUTION,
    build_default_model,
    format_prompt,
    load_default_model,
    normalize_answer,
)

__all__ = [
    "DEFAULT_RESOLUTION",
    "build_default_model",
    "format_prompt",
    "load_default_model",
    "normalize_answer",
]
