"""Serving prumerge's reduced visual tokens with an inference engine (vLLM, ``serve.vllm``).

``hf_overrides(method, keep=...)`` gives the settings that make vLLM serve a LLaVA checkpoint
with a fixed budget; this package imports no engine itself.
"""

from prumerge.serve.config import (
    ARCHITECTURE,
    CONFIG_KEY,
    ServeConfig,
    hf_overrides,
    output_count,
    parse_serve_config,
)

__all__ = [
    "ARCHITECTURE",
    "CONFIG_KEY",
    "ServeConfig",
    "hf_overrides",
    "output_count",
    "parse_serve_config",
]
