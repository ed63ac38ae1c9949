"""One training step's loss: the batch reduced by one method, the LLM on the reduced tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from prumerge.train.packing import IGNORE, TrainSequence, collate

# The LLM's input width is rounded up to a multiple of this. Reduction makes every step's width
# different; CPU kernels (oneDNN) build and cache a kernel per shape, and with a new shape at
# every step that cache grew by gigabytes an hour. Padding is masked, so results are unchanged.
PAD_MULTIPLE = 64


def _pad_width(prepared: dict[str, Any], multiple: int) -> dict[str, Any]:
    """Right-pad ``prepare_inputs``' output (4-D mask) to a width that is a multiple."""
    embeds = prepared["inputs_embeds"]
    batch, width, _ = embeds.shape
    extra = -width % multiple
    if extra == 0:
        return prepared
    new = width + extra
    mask = prepared["attention_mask"]  # (B, 1, L, L) bool
    grown = torch.zeros((batch, mask.shape[1], new, new), dtype=mask.dtype)
    grown[:, :, :width, :width] = mask
    grown[:, :, torch.arange(width, new), torch.arange(width, new)] = True  # pads see themselves
    return {
        "inputs_embeds": F.pad(embeds, (0, 0, 0, extra)),
        "attention_mask": grown,
        "position_ids": F.pad(prepared["position_ids"], (0, extra)),
        "labels": F.pad(prepared["labels"], (0, extra), value=IGNORE),
    }


def step_loss(
    model: Any,
    processor: Any,
    method: str,
    options: dict[str, Any],
    images: list[Any],
    sequences: list[TrainSequence],
    normaliser: float,
) -> tuple[torch.Tensor, int]:
    """Summed answer-token cross-entropy of a batch under one reduction, over ``normaliser``.

    Returns:
        ``(loss, visual tokens the LLM saw)``.
    """
    import prumerge

    pad_id = processor.tokenizer.pad_token_id
    batch = collate(sequences, 0 if pad_id is None else pad_id)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with prumerge.apply(model, method, **options) as handle:
        prepared = handle.prepare_inputs(
            batch.input_ids,
            pixels,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            position_ids=batch.position_ids,
        )
        visual = sum(handle.stats.tokens_out)
    prepared = _pad_width(prepared, PAD_MULTIPLE)
    lm = model.model.language_model
    hidden = lm(
        inputs_embeds=prepared["inputs_embeds"],
        attention_mask=prepared["attention_mask"],
        position_ids=prepared["position_ids"],
    ).last_hidden_state  # (B, L', C)
    # Position t predicts token t + 1; the LM head runs only where that is an answer token.
    target = prepared["labels"][:, 1:]
    keep = target != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # (T, V)
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum") / normaliser
    return loss, visual
