"""What a served model reduces: one method and its budget, read from the model's config.

vLLM sizes each image's run of placeholder tokens when it processes the prompt, before the
model's encoder runs. A fixed budget gives every image the same, known number of tokens; an
adaptive one (PruMerge's IQR count) is counted by the plugin's multimodal processor, which
runs the tower and the reduction itself (``prumerge.serve.vllm.adaptive``). This module
turns the ``prumerge`` entry of a model's config (set with vLLM's ``--hf-overrides`` or
written into ``config.json``) into a reduction method and, for a fixed budget, its count.
It imports neither vLLM nor transformers, so the main environment can test it.
"""

from __future__ import annotations

import json
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.methods import VisionMethod
from prumerge.methods.spec import MethodSpec, make_spec, trial_inputs

#: The architecture name the plugin registers with vLLM's ModelRegistry.
ARCHITECTURE = "PrumergeLlavaForConditionalGeneration"
#: The same for Qwen2.5-VL checkpoints (``prumerge.serve.vllm.qwen``).
QWEN_ARCHITECTURE = "PrumergeQwen2_5_VLForConditionalGeneration"
#: The config attribute that holds ``{"method": ..., **options}``.
CONFIG_KEY = "prumerge"


#: A validated serving configuration: a ``MethodSpec`` (``keep`` is the budget).
ServeConfig = MethodSpec


def is_adaptive(config: ServeConfig) -> bool:
    """Whether each image chooses its own count: ``keep`` left out, None or "adaptive" for
    a method whose default budget is adaptive (PruMerge and PruMerge+)."""
    return config.takes_budget and config.budget is None


def serve_config_of(
    hf_config: Any, *, architecture: str = ARCHITECTURE, keep: int = 64, projected: bool = False
) -> ServeConfig:
    """The validated ``prumerge`` entry of a served model's config; without one, a one-line
    error showing the ``--hf-overrides`` that gives ``architecture`` one (``keep`` is the
    example's budget; ``projected`` as for ``parse_serve_config``)."""
    value = getattr(hf_config, CONFIG_KEY, None)
    if value is None:
        raise PrumergeError(
            f"the model config has no {CONFIG_KEY!r} entry; pass e.g. --hf-overrides "
            f'\'{{"architectures": ["{architecture}"], '
            f'"{CONFIG_KEY}": {{"method": "prumerge+", "keep": {keep}}}}}\''
        )
    return parse_serve_config(value, projected=projected)


def parse_serve_config(value: Any, *, projected: bool = False) -> ServeConfig:
    """Validate the ``prumerge`` config entry of a served model.

    Args:
        value: a dict ``{"method": "prumerge+", "keep": 64, ...}`` (or its JSON text).
            Values may be text, as on the command line (``"keep": "0.25"``).
        projected: the served family reduces projected tokens, after the tower (Qwen2.5-VL,
            whose PatchMerger is the projector): methods that select on the projector's
            outputs are served there, and ToMe's default merges after the tower.

    Returns:
        The ``ServeConfig``.

    Raises:
        PrumergeError: for a missing or unknown method, unknown options, an LLM-side method
            (FastV prunes inside the language model, which the plugin does not patch), a
            method that resizes the input image (downsample), a method that merges inside
            the tower or selects on the projector's outputs (both served where
            ``projected``), a method that reads the prompt's instruction. An adaptive budget (PruMerge's
            and PruMerge+'s default) is served: the plugin's multimodal processor counts and
            reduces each image (``prumerge.serve.vllm.adaptive``).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise PrumergeError(f"the {CONFIG_KEY!r} config is not valid JSON: {value!r}") from None
    if not isinstance(value, dict) or not isinstance(value.get("method"), str):
        raise PrumergeError(
            f"the {CONFIG_KEY!r} config must be a dict with a 'method' name, e.g. "
            f'{{"method": "prumerge+", "keep": 64}}; got {value!r}'
        )
    from prumerge.methods import projects_first

    # The same spec, parser and checks as the CLI, the Python API and the lmms-eval plugin:
    # text values are typed ("64" is a count, "0.25" a ratio) and the constructor judges them.
    config = make_spec(value["method"], {k: v for k, v in value.items() if k != "method"})
    method = config.build()
    if getattr(method, "inside_llm", False):
        raise PrumergeError(
            f"method {config.method!r} prunes inside the language model, which the vLLM plugin "
            f"does not patch; serve a vision-side method (prumerge, prumerge+, visionzip, "
            f"cls_topk, pool, random, tome, divprune or none)"
        )
    if getattr(method, "resizes_input", False):
        raise PrumergeError(
            f"method {config.method!r} runs the vision tower on a resized image, which the vLLM "
            f"plugin does not do; serve a method that reduces the tower's tokens"
        )
    if getattr(method, "object_layer", None) is not None:
        raise PrumergeError(
            f"method {config.method!r} reads the attention of two vision-tower layers, and the "
            f"vLLM plugin records one; serve a single-layer method (e.g. vispruner, cls_topk)"
        )
    if getattr(method, "needs_instruction", False):
        raise PrumergeError(
            f"method {config.method!r} reads the prompt's instruction, which vLLM's multimodal "
            f"processor does not pass with the image; serve a method that reads the image only"
        )
    if projected:
        if getattr(method, "where", "after") == "tower":
            raise PrumergeError(
                f"method {config.method!r} with where='tower' merges inside the vision tower, "
                f"which this family cannot; serve it with where='after' or 'auto'"
            )
        return config
    if getattr(method, "where", "after") != "after":
        raise PrumergeError(
            f"method {config.method!r} merges inside the vision tower by default, which the "
            f"vLLM plugin does not do; serve it with where='after'"
        )
    if projects_first(method):
        raise PrumergeError(
            f"method {config.method!r} selects on the projector's outputs, which the vLLM "
            f"plugin does not compute before reducing; serve it with space='tower'"
        )
    return config


def hf_overrides(method: str, **options: Any) -> dict[str, Any]:
    """The ``hf_overrides`` that make vLLM serve a LLaVA checkpoint through the plugin.

    Pass the result to ``vllm.LLM(model, hf_overrides=...)``, or its JSON to
    ``vllm serve MODEL --hf-overrides``.

    Args:
        method: a vision-side method name, e.g. ``"prumerge+"``.
        **options: its options; ``keep`` is an int count, a float ratio of the N patches,
            or left out / None / ``"adaptive"`` for PruMerge's per-image count.
    """
    config = parse_serve_config({"method": method, **options})
    return {"architectures": [ARCHITECTURE], CONFIG_KEY: config.as_dict()}


def output_count(
    method: VisionMethod,
    num_patches: int,
    grid: tuple[int, int] | None = None,
) -> int:
    """The number of tokens the method sends to the LLM for every image of N patches.

    The method's own ``reduce`` runs on two small made-up images, so the count comes from
    the same code that reduces real images. A fixed budget gives a count that does not
    depend on the image; if the two images disagree, the method cannot be served.

    Args:
        method: a built vision-side method.
        num_patches: N, the patch tokens per image.
        grid: (rows, cols) of the patch grid, if not square.

    Returns:
        K, the output tokens per image.
    """
    inputs = trial_inputs(batch=2, num_patches=num_patches, grid=grid)
    lengths = method.reduce(inputs).lengths.tolist()
    if lengths[0] != lengths[1]:
        raise PrumergeError(
            f"method {method.name!r} with options {method.options()} keeps a different number "
            f"of tokens per image ({lengths[0]} and {lengths[1]} of {num_patches}), so vLLM "
            f"cannot size its placeholders; give a fixed budget"
        )
    return int(lengths[0])
