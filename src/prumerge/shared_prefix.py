"""Greedy answers to many questions per image, each image's prompt prefix computed once.

Benchmarks such as easy-vqa and the generated scenes ask about ten questions per image. Asked
one by one, every question pays for the vision tower, the reduction and the LLM's pass over the
image's tokens again. Here each image's prefix, the prompt up to and including its (reduced)
visual tokens, goes through the LLM once; its KV cache is then shared by all of that image's
questions, which run as rows of one batch. The answers are those of ``model.generate`` with
greedy decoding and the same reduction: the tokens, positions and attention pattern are the
same (``tests/test_shared_prefix.py`` checks it against ``generate`` for several methods).

It works for vision-side methods only: FastV ranks image tokens by the attention of the
question's last token, so its visual tokens depend on the question.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prumerge.errors import PrumergeError

__all__ = ["SHARED_FAMILIES", "answer_shared_prefix", "can_share"]

#: Families whose LLM reads nothing but the shortened sequence at consecutive 1-D positions,
#: which the prefix pass builds. The others (M-RoPE, DeepStack side inputs, a bidirectional
#: image block, tiles read off the prompt) answer through ``generate``.
SHARED_FAMILIES = ("llava", "llava_next", "llava_onevision")


def can_share(handle: Any) -> bool:
    """Whether ``answer_shared_prefix`` answers as ``generate`` would with this handle."""
    adapter = getattr(handle, "adapter", None)
    return (
        getattr(handle, "fastv", None) is None
        and getattr(handle, "positions", "compact") == "compact"
        and getattr(type(adapter), "family", None) in SHARED_FAMILIES
    )


def _cache_argument(language_model: torch.nn.Module) -> str:
    # transformers 5.x renamed the decoder's `past_key_values` argument to `cache`.
    params = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config, model.config.get_text_config()):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None and not ids:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def answer_shared_prefix(
    model: Any,
    processor: Any,
    handle: Any,
    images: Sequence[Any],
    questions: Sequence[Sequence[str]],
    prompt_fn: Callable[[str], str],
    *,
    max_new_tokens: int = 8,
) -> list[list[str]]:
    """Greedy answers to several questions about each image, sharing each image's prefix.

    Args:
        model: a model of one of ``SHARED_FAMILIES``, patched by ``prumerge.apply``.
        processor: its processor.
        handle: the ``Handle`` that ``prumerge.apply`` returned (a vision-side method).
        images: I PIL images.
        questions: for each image, its questions (each with any answer instruction).
        prompt_fn: formats one question into the model's prompt with one image token.
        max_new_tokens: greedy decoding stops at the end of turn or after this many tokens.

    Returns:
        For each image, the decoded answer to each of its questions.
    """
    if getattr(handle, "fastv", None) is not None:
        raise PrumergeError("shared-prefix answering needs a vision-side method, not fastv")
    if getattr(handle, "positions", "compact") != "compact":
        # The prefix pass numbers positions consecutively (compact); "original" positions
        # (the kept patches' own, M-RoPE on Qwen) are built only by the handle's own path.
        raise PrumergeError("shared-prefix answering needs positions='compact'")
    from transformers import DynamicCache

    tokenizer = processor.tokenizer
    image_id = model.config.image_token_id
    image_token = getattr(processor, "image_token", "<image>")
    lm = model.model.language_model
    embed = model.get_input_embeddings()
    device = embed.weight.device
    cache_arg = _cache_argument(lm)
    eos = _eos_ids(model, tokenizer)
    suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # Every image input the family takes (image_sizes for NeXT and OneVision...), not only
    # the pixels.
    processed = processor.image_processor(list(images), return_tensors="pt")
    image_inputs = {k: processed[k] for k in handle.adapter.image_inputs if k in processed}
    if "batch_num_images" in handle.adapter.image_inputs and "batch_num_images" not in processed:
        image_inputs["batch_num_images"] = torch.ones(len(images), dtype=torch.long)
    features = handle.encode_images(**image_inputs)  # I tensors (K_i, H)

    # Token ids of every prompt with a single image token; the prefix ends at that token.
    prefixes: list[list[int]] = []
    suffixes: list[list[int]] = []  # one per question, in image order
    owner: list[int] = []  # image of each question row
    for i, qs in enumerate(questions):
        first: list[int] | None = None
        for question in qs:
            text = prompt_fn(question)
            if text.count(image_token) != 1:
                raise PrumergeError("each prompt must hold exactly one image token")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            where = ids.index(image_id)
            if first is None:
                first = ids[:where]
            elif ids[:where] != first:
                raise PrumergeError("the prompts of one image do not share their prefix")
            suffixes.append(ids[where + 1 :])
            owner.append(i)
        prefixes.append((first or []) + [image_id] * features[i].shape[0])

    # The prefixes, left-padded into one batch: (I, P).
    count = len(prefixes)
    width = max(len(p) for p in prefixes)
    prefix_ids = torch.full((count, width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((count, width), dtype=torch.long)
    for i, p in enumerate(prefixes):
        prefix_ids[i, width - len(p) :] = torch.tensor(p)
        prefix_mask[i, width - len(p) :] = 1
    prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
    embeds = embed(prefix_ids)
    image_slots = prefix_ids == image_id
    embeds[image_slots] = torch.cat(features).to(device=device, dtype=embeds.dtype)
    positions = (prefix_mask.cumsum(1) - 1).clamp_min(0)
    cache = DynamicCache()
    lm(
        inputs_embeds=embeds,
        attention_mask=prefix_mask,
        position_ids=positions,
        use_cache=True,
        **{cache_arg: cache},
    )
    rows = torch.tensor(owner, device=device)
    cache.batch_select_indices(rows)  # one cache row per question
    prefix_mask = prefix_mask[rows]
    next_position = torch.tensor([len(prefixes[i]) for i in owner], device=device)

    # The questions, right-padded after their image's prefix: (Q, S).
    n = len(suffixes)
    span = max(len(s) for s in suffixes)
    suffix_ids = torch.full((n, span), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((n, span), dtype=torch.long)
    for r, s in enumerate(suffixes):
        suffix_ids[r, : len(s)] = torch.tensor(s)
        suffix_mask[r, : len(s)] = 1
    suffix_ids, suffix_mask = suffix_ids.to(device), suffix_mask.to(device)
    mask = torch.cat([prefix_mask, suffix_mask], dim=1)
    out = lm(
        input_ids=suffix_ids,
        attention_mask=mask,
        position_ids=next_position[:, None] + torch.arange(span, device=device),
        use_cache=True,
        **{cache_arg: cache},
    )
    lengths = suffix_mask.sum(1)
    last = out.last_hidden_state[torch.arange(n, device=device), lengths - 1]  # (Q, C)
    next_position = next_position + lengths
    generated: list[list[int]] = [[] for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = model.lm_head(last).float()  # (Q, V)
        if suppressed:
            logits[:, suppressed] = float("-inf")
        token = logits.argmax(-1).cpu()  # (Q,)
        for r in range(n):
            if not done[r]:
                if int(token[r]) in eos:
                    done[r] = True
                else:
                    generated[r].append(int(token[r]))
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        out = lm(
            input_ids=token.to(device)[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_arg: cache},
        )
        next_position = next_position + 1
        last = out.last_hidden_state[:, -1]
    texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    answers: list[list[str]] = [[] for _ in questions]
    for r, i in enumerate(owner):
        answers[i].append(texts[r])
    return answers
