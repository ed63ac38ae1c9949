"""Turning one image's question-answer turns into one training sequence, and sequences into
batches.

Two packings:

- **isolated** (the default model's): the image prefix is stored once, followed by every turn
  as its own single-question prompt that attends to the prefix and to itself only, at the
  positions it would have on its own (a block mask and restarted position ids). Every answer
  token is then predicted exactly as it would be for its question alone, while the image's
  tokens are paid for once. A plain multi-turn chat lets later questions read earlier answers:
  easy-vqa asks "what color is the shape?" and then "is there a red shape?" about one image.
- **chat** (LLaVA's instruction data): one multi-turn conversation, rendered by the model's
  chat template, with the image in the first user turn; later turns see earlier ones.

The loss covers each answer and the end-of-turn text the template puts after it, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prumerge.errors import PrumergeError

IGNORE = -100


@dataclass
class TrainSequence:
    """One packed training sequence, (L,) int64 tensors.

    Attributes:
        input_ids: ids with N placeholders for the image.
        labels: -100 except on answer tokens.
        position_ids: positions (restarting per turn for isolated packing).
        segments: 0 for the shared prefix, k for turn k; None for chat packing.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor | None


def _image_id(processor: Any) -> int:
    tokenizer = processor.tokenizer
    return int(tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>")))


def encode_isolated_turns(
    processor: Any,
    turns: Sequence[tuple[str, str]],
    num_image_tokens: int,
    prompt_fn: Callable[[str], str],
    end_of_turn: str,
) -> TrainSequence:
    """One packed sequence whose turns cannot see each other.

    Every turn is tokenised as its own single-question prompt, ``prompt_fn(question)``
    followed by ``answer + end_of_turn``. The prompts of one image share their prefix up to
    and including the image placeholders; that prefix is stored once, followed by each turn's
    remaining tokens. Turn k's tokens get segment k and the positions they have in their own
    prompt, so with ``isolation_mask`` every answer token is predicted exactly as it would be
    for that question alone.

    Args:
        processor: the model's processor.
        turns: (question, answer) pairs about one image.
        num_image_tokens: placeholders the image token expands to.
        prompt_fn: formats one question (with one image token) the way inference does.
        end_of_turn: the text that ends an answer (SmolLM2's ``<|im_end|>``).
    """
    if not turns:
        raise PrumergeError("an image with no question-answer turn cannot be encoded")
    tokenizer = processor.tokenizer
    image_id = _image_id(processor)
    eos_ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
    prefix: list[int] | None = None
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    segments: list[int] = []
    for k, (question, answer) in enumerate(turns, start=1):
        prompt = prompt_fn(question)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(prompt + answer + end_of_turn, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids or full_ids[-len(eos_ids) :] != eos_ids:
            raise PrumergeError("an answer does not tokenise separately from its prompt")
        where = prompt_ids.index(image_id)
        if prefix is None:
            prefix = prompt_ids[:where] + [image_id] * num_image_tokens
            ids += prefix
            labels += [IGNORE] * len(prefix)
            positions += range(len(prefix))
            segments += [0] * len(prefix)
        elif prompt_ids[:where] != prefix[:where]:
            raise PrumergeError("the prompts of one image do not share their prefix")
        rest = full_ids[where + 1 :]
        answer_start = len(prompt_ids) - (where + 1)
        ids += rest
        labels += [IGNORE] * answer_start + rest[answer_start:]
        positions += range(len(prefix), len(prefix) + len(rest))
        segments += [k] * len(rest)
    return TrainSequence(
        torch.tensor(ids), torch.tensor(labels), torch.tensor(positions), torch.tensor(segments)
    )


def encode_chat(
    processor: Any,
    turns: Sequence[tuple[str, str]],
    num_image_tokens: int,
    render: Callable[[list[dict[str, Any]], bool], str],
) -> TrainSequence:
    """One multi-turn conversation about one image, the image in the first user turn.

    Args:
        processor: the model's processor.
        turns: (user text, assistant answer) pairs.
        num_image_tokens: placeholders the image token expands to.
        render: ``render(messages, add_generation_prompt)``, the model's chat template.

    The conversation is rendered turn by turn; each answer's tokens are those the full
    rendering adds after the prompt that asks for it, so the template must render
    conversations incrementally (LLaVA's and ChatML templates do).
    """
    if not turns:
        raise PrumergeError("an image with no question-answer turn cannot be encoded")
    tokenizer = processor.tokenizer
    image_id = _image_id(processor)
    messages: list[dict[str, Any]] = []
    text = ""
    spans: list[tuple[int, int]] = []
    for k, (question, answer) in enumerate(turns):
        content: list[dict[str, str]] = [{"type": "image"}] if k == 0 else []
        content.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": content})
        prompt = render(messages, True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = render(messages, False)
        if not (prompt.startswith(text) and full.startswith(prompt)):
            raise PrumergeError("the chat template does not render conversations incrementally")
        spans.append((len(prompt), len(full)))
        text = full
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        # Whitespace between turns belongs to no answer.
        if end > start and any(a <= start < b for a, b in spans) and text[start:end].strip():
            labels[t] = ids[t]
    if ids.count(image_id) != 1:
        raise PrumergeError("a conversation must hold exactly one image token")
    where = ids.index(image_id)
    ids = ids[:where] + [image_id] * num_image_tokens + ids[where + 1 :]
    labels = labels[:where] + [IGNORE] * num_image_tokens + labels[where + 1 :]
    return TrainSequence(torch.tensor(ids), torch.tensor(labels), torch.arange(len(ids)), None)


def isolation_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (True = may attend) for isolated packing.

    Args:
        segments: (B, L) int64; 0 for the shared prefix, k >= 1 for turn k, -1 for padding
            (chat packing: every real token in segment 0).

    Returns:
        (B, 1, L, L) bool: query i sees key j <= i when j is in the prefix or in i's own
        turn. Padding queries see only themselves (no empty rows, so no NaN).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query = segments.unsqueeze(2)  # (B, L, 1)
    key = segments.unsqueeze(1)  # (B, 1, L)
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    return allowed.unsqueeze(1)


@dataclass
class Batch:
    """Sequences padded on the right into one batch.

    Attributes:
        input_ids, labels, position_ids: (B, L).
        attention_mask: (B, 1, L, L) bool (isolation_mask of the segments).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor


def collate(sequences: Sequence[TrainSequence], pad_id: int) -> Batch:
    """Pad sequences on the right; chat sequences are one segment, so they stay causal."""
    width = max(len(s.input_ids) for s in sequences)
    count = len(sequences)
    ids = torch.full((count, width), pad_id, dtype=torch.long)
    labels = torch.full((count, width), IGNORE, dtype=torch.long)
    positions = torch.zeros((count, width), dtype=torch.long)
    segments = torch.full((count, width), -1, dtype=torch.long)
    for b, s in enumerate(sequences):
        n = len(s.input_ids)
        ids[b, :n] = s.input_ids
        labels[b, :n] = s.labels
        positions[b, :n] = s.position_ids
        segments[b, :n] = 0 if s.segments is None else s.segments
    return Batch(ids, labels, positions, isolation_mask(segments))
