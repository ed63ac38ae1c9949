"""The prumerge plugin for vLLM: LLaVA models that serve reduced visual tokens.

vLLM loads ``register`` through the ``vllm.general_plugins`` entry point in every process
it starts. It registers ``PrumergeLlavaForConditionalGeneration``; a LLaVA checkpoint is
served through it with::

    vllm serve MODEL --hf-overrides '{"architectures": ["PrumergeLlavaForConditionalGeneration"],
                                      "prumerge": {"method": "prumerge+", "keep": 64}}'

or ``vllm.LLM(MODEL, hf_overrides=prumerge.serve.hf_overrides("prumerge+", keep=64))``.
"""

from __future__ import annotations

from prumerge.serve.config import ARCHITECTURE, QWEN_ARCHITECTURE


def register() -> None:
    """Register the plugin's model class with vLLM (safe to call more than once)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A "module:Class" string: vLLM imports the model only in the processes that build it.
        ModelRegistry.register_model(
            ARCHITECTURE, "prumerge.serve.vllm.model:PrumergeLlavaForConditionalGeneration"
        )
    if QWEN_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            QWEN_ARCHITECTURE,
            "prumerge.serve.vllm.qwen:PrumergeQwen2_5_VLForConditionalGeneration",
        )
