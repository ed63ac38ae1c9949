"""The instruction each image came with, for methods that weigh patches by their relevance
to it (CDPruner): the real tokens of its row after the row's last image placeholder (the
question and the chat template's suffix), as the LLM's input embeddings or as text."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prumerge.adapters.sequence import assign_placeholders


def instruction_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
    counts: torch.Tensor,
) -> list[torch.Tensor]:
    """Per image, the (M,) ids of its instruction (empty for an image of no row).

    Args:
        input_ids: (B, L) the caller's ids, placeholders unreduced.
        attention_mask: (B, L) or None; padding is no instruction.
        image_token_id: the placeholder id.
        counts: (I,) placeholders of every image, in order across rows.
    """
    image_of, _ = assign_placeholders(input_ids, image_token_id, counts)
    is_image = input_ids == image_token_id
    real = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    per_image: list[torch.Tensor] = [input_ids.new_empty(0)] * int(counts.shape[0])
    for row in range(input_ids.shape[0]):
        if not bool(is_image[row].any()):
            continue
        last = int(positions[is_image[row]].max())
        text = input_ids[row][(positions > last) & real[row]]
        for image in image_of[row][is_image[row]].unique().tolist():
            per_image[image] = text
    return per_image


def instruction_embeddings(ids: list[torch.Tensor], embed: nn.Module) -> list[torch.Tensor]:
    """Per image, the (M, H) LLM input embeddings of its instruction ids."""
    with torch.no_grad():
        return [embed(row[None])[0] for row in ids]


def instruction_texts(ids: list[torch.Tensor], tokenizer: Any) -> list[str]:
    """Per image, its instruction as text (the LLM tokenizer's decoding, special tokens
    left out), for a second model with its own tokenizer (a CLIP text tower)."""
    return [tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in ids]
