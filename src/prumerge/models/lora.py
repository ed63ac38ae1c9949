"""Merging a trained LoRA adapter into a language model's weights, when a model is built.

Training (``prumerge.train.lora``) adds and saves the adapters; building a model only merges
them, so inference pays nothing and the model stays a plain Hugging Face class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prumerge.errors import PrumergeError

__all__ = ["merge_lora"]


def merge_lora(language_model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """``language_model`` with the adapter in ``directory`` merged into its weights.

    Returns the same class as it was given (peft's merge and unload), with no adapter left.
    """
    from peft import PeftModel

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise PrumergeError(f"{directory} holds no LoRA adapter (adapter_config.json)")
    wrapped = PeftModel.from_pretrained(language_model, str(directory))
    return wrapped.merge_and_unload()
