"""LoRA adapters on the language model, through peft.

Training adds rank-r adapters to the decoder's linear layers (``DEFAULT_TARGETS``: attention
q/k/v/o and the MLP's gate/up/down, the set LLaVA's LoRA recipe adapts). They are saved in
peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``), and merged into
the weights when a model is built, so inference pays nothing and the model stays a plain
Hugging Face class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.models.lora import merge_lora  # building a model merges; it lives with models

__all__ = [
    "DEFAULT_TARGETS",
    "add_lora",
    "lora_state",
    "load_lora_state",
    "merge_lora",
    "save_lora",
]

#: Linear layers of a LLaMA-style decoder that get adapters.
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def add_lora(
    language_model: torch.nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> Any:
    """Inject LoRA adapters into ``language_model`` in place and return peft's wrapper.

    The wrapped module's own layers now carry the adapters, so calling ``language_model``
    directly trains them too. Adapter weights stay float32 when the model runs in bfloat16.

    Args:
        language_model: the decoder (e.g. ``model.model.language_model``).
        rank: LoRA rank r.
        alpha: scaling numerator (the update is B A x * alpha / r); default 2 r.
        targets: module names to adapt.
        dropout: dropout on the adapters' input.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise PrumergeError("LoRA needs peft: pip install 'prumerge[train]'") from None
    present = {name.rsplit(".", 1)[-1] for name, _ in language_model.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        raise PrumergeError(
            f"--lora-targets: {type(language_model).__name__} has no module named "
            f"{', '.join(missing)}"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        bias="none",
    )
    return get_peft_model(language_model, config, autocast_adapter_dtype=True)


def lora_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter weights, as peft saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_lora_state(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights saved by ``lora_state``, insisting that every one is used."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise PrumergeError(f"LoRA weights do not fit this model: {unexpected[:3]}")


def save_lora(peft_model: Any, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory``."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory
