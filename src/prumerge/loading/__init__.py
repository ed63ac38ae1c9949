"""Loading a model for the commands, eval and the lmms-eval plugin: the embedded default
model, or a Hugging Face checkpoint of any supported family, picked from its config."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.loading.checkpoint import (
    _first_line,
    check_methods,
    load_processor,
    model_class_name,
    read_config,
)
from prumerge.loading.devices import (
    DEVICE_MAP_STRATEGIES,
    DTYPES,
    _map_device,
    model_device,
    parse_device_map,
    resolve_device,
    resolve_dtype,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_variant(model: str | None) -> str | None:
    """The embedded model's variant that ``--model`` names, or None for a Hugging Face model.

    ``None`` and ``"default"`` mean the default variant; ``"default:base"`` (any
    ``default:VARIANT``) a named one. Unknown variants get a one-line error.
    """
    if model is None or model == "default":
        return "default"
    if not model.startswith("default:"):
        return None
    from prumerge.models.default import VARIANTS

    variant = model.split(":", 1)[1]
    if variant not in VARIANTS:
        raise PrumergeError(
            f"--model {model}: unknown variant; choose default:{' or default:'.join(VARIANTS)}"
        )
    return variant


def load_model(
    model: str | None,
    *,
    device: str | None = "cpu",
    cache_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    methods: list[Any] | None = None,
):
    """``(model, processor, prompt_fn)`` for the default model (None, ``"default"`` or
    ``"default:base"``) or an HF id/directory.

    ``prompt_fn(question)`` formats one question about one image with the model's template.

    Args:
        model: a Hugging Face id or directory of any supported family (the class is
            read from its config before any weights load); None, ``"default"`` or
            ``"default:VARIANT"`` for the embedded default model.
        device: where to put the model (``auto``/None: this process's GPU if any, else CPU).
            Ignored with ``device_map``.
        cache_dir: the default model's cache root.
        dtype: a torch dtype or its name (see ``DTYPES``); None: float32 on the CPU,
            bfloat16 (or float16) on CUDA. Both are given to ``from_pretrained``, so weights
            load in that precision and are never held in float32 first.
        device_map: given to ``from_pretrained`` (accelerate places the modules and hooks
            them); see ``parse_device_map``.
        methods: method instances the model will run: one the checkpoint's family cannot
            run is refused before any weights load.

    Raises:
        PrumergeError: a path that does not exist, an unsupported architecture (before any
            weights load), a checkpoint that does not load, or a model cache that
            cannot be used.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    variant = default_variant(model)
    device_map = parse_device_map(device_map)
    if device_map is None:
        device = resolve_device(device)
        placed_on = device
    else:
        placed_on = _map_device(device_map)
    torch_dtype = resolve_dtype(dtype, placed_on)
    if variant is not None:
        from prumerge.models.cache import CacheError, describe_cache_root
        from prumerge.models.default import format_prompt, load_default_model

        try:
            loaded, processor = load_default_model(
                cache_dir=cache_dir,
                device=device,
                dtype=torch_dtype,
                device_map=device_map,
                variant=variant,
            )
        except CacheError as exc:
            raise PrumergeError(f"{exc} ({describe_cache_root(cache_dir)})") from None
        return loaded, processor, lambda question: format_prompt(processor, question)

    import transformers

    path = Path(model).expanduser()
    if not path.exists() and not _HUB_ID.match(model):
        raise PrumergeError(f"model path does not exist: {model}")
    source = str(path) if path.exists() else model
    config = read_config(source)
    class_name = model_class_name(config, f"--model {model}")
    check_methods(config, class_name, list(methods or []))
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded = getattr(transformers, class_name).from_pretrained(source, **kwargs)
        processor = load_processor(source)
    except (OSError, ValueError, ImportError) as exc:
        where = "directory" if path.exists() else "hub id (is the network reachable?)"
        raise PrumergeError(
            f"cannot load model from {where} {model!r}: {_first_line(exc)}"
        ) from None
    if device_map is None:
        loaded = loaded.to(device)
    loaded = loaded.eval()
    return loaded, processor, prompt_function(processor)


def prompt_function(processor: Any) -> Callable[[str], str]:
    """``prompt(question)``: one question about one image, in the processor's chat template
    (each family's own format), or LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` without one."""

    def prompt(question: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return f"USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's format

    return prompt


__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "DTYPES",
    "default_variant",
    "load_model",
    "model_device",
    "parse_device_map",
    "prompt_function",
    "resolve_device",
    "resolve_dtype",
]
