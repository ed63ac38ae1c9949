"""Attention weights of a few query rows, recomputed from the input an attention module
received (captured by a pre-hook), so LLM-side methods can score tokens under eager, sdpa
or flash attention alike."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from prumerge.errors import PrumergeError


def rotary_function(
    attention: nn.Module, name: str
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``apply_rotary_pos_emb`` of the attention module's own model file."""
    module = inspect.getmodule(type(attention))
    function = getattr(module, "apply_rotary_pos_emb", None)
    if function is None or not all(
        hasattr(attention, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")
    ):
        raise PrumergeError(
            f"{name} supports LLaMA-style attention with rotary embeddings; got {type(attention).__name__}"
        )
    return function


def attention_scores(
    attention: nn.Module,
    rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    queries: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """The softmax attention of a few query rows of one attention module, recomputed from its
    input (q/k projections and rotary embeddings; grouped key heads repeated).

    Args:
        attention: the module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``).
        rotary: its ``apply_rotary_pos_emb``.
        hidden: (B, L, H) its (normed) input.
        position_embeddings: (cos, sin), (B or 1, L, D).
        queries: (B, Q) int64 rows whose attention is wanted.
        key_mask: (B, Q, L) bool, True where query q may attend to key l.

    Returns:
        (B, heads, Q, L) float32 attention weights.
    """
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
    index = queries[..., None]
    picked = hidden.gather(1, index.expand(-1, -1, hidden.shape[-1]))
    query = attention.q_proj(picked).view(batch, queries.shape[1], -1, head_dim).transpose(1, 2)
    key = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    q_cos = cos.gather(1, index.expand(-1, -1, cos.shape[-1]))
    q_sin = sin.gather(1, index.expand(-1, -1, sin.shape[-1]))
    query = rotary(query, query, q_cos, q_sin)[0]
    key = rotary(key, key, cos, sin)[0]
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
    logits = (query @ key.transpose(-1, -2)).float() * attention.scaling  # (B, h, Q, L)
    logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    return logits.softmax(dim=-1)
