"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) on HF LLaVA.

FastV prunes image tokens inside the language model: layers 0..K-1 see every token; from
layer K on, each image keeps only the R tokens that received the most attention from the
prompt's last token in layer K-1. Dropped tokens are removed from the hidden states, the
rotary position embeddings, the attention mask and the KV cache of layers >= K, so the
later layers really run on the shorter sequence; kept tokens keep their original positions.

The attention is computed here from the inputs of layer K-1's attention module (captured by a
scoped pre-hook), for the last query only, so the model can run with sdpa or flash attention.
The choice is made once per generate call, at its first forward pass, and reused by later
steps, with or without the KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prumerge.errors import PrumergeError
from prumerge.ops.select import budget_count, rank_descending


@dataclass
class _Call:
    """State of one generate (or forward) call."""

    image_mask: torch.Tensor  # (B, L) placeholder positions of the prompt
    padding_mask: torch.Tensor  # (B, L) 1 for real tokens
    tokens_per_image: int
    keep: int
    captured: dict[str, Any]
    dropped: torch.Tensor | None = None  # (B, L) prompt positions removed from layers >= K
    plan: _Plan | None = None  # the current forward pass's rows and columns


class FastVPatch:
    """Wraps the decoder layers >= K of one language model instance."""

    def __init__(self, language_model: nn.Module, layer: int) -> None:
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise PrumergeError(
                f"fastv needs a LLaMA-style decoder with .layers; got {type(language_model).__name__}"
            )
        if not 1 <= layer < len(layers):
            raise PrumergeError(f"fastv layer K={layer} must be in 1..{len(layers) - 1}")
        attention = layers[layer - 1].self_attn
        self.rotary = _rotary_function(attention)
        self.layers = layers
        self.layer = layer
        self.call: _Call | None = None
        for index in range(layer, len(layers)):
            module = layers[index]
            original = module.forward
            module.forward = self._wrap(original, first=index == layer)
        self._hook = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def remove(self) -> None:
        for index in range(self.layer, len(self.layers)):
            del self.layers[index].forward
        self._hook.remove()

    # -- per call ----------------------------------------------------------------------
    def arm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_token_id: int,
        tokens_per_image: int,
        keep: int | float,
    ) -> int:
        """Prepare for one call; returns the kept tokens per image."""
        image_mask = input_ids == image_token_id
        per_row = image_mask.sum(dim=1)
        if bool((per_row != per_row[0]).any()):
            raise PrumergeError("fastv needs the same number of images in every row of a batch")
        kept = budget_count(keep, tokens_per_image)
        self.call = _Call(
            image_mask=image_mask,
            padding_mask=attention_mask.bool(),
            tokens_per_image=tokens_per_image,
            keep=kept,
            captured={},
        )
        return kept

    def disarm(self) -> None:
        self.call = None

    def _capture(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self.call
        if call is None or call.dropped is not None:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        call.captured["hidden"] = hidden
        call.captured["position_embeddings"] = kwargs.get("position_embeddings")

    def _select(self, call: _Call) -> torch.Tensor:
        """(B, L) bool: image positions to drop, from layer K-1's last-token attention."""
        attention = self.layers[self.layer - 1].self_attn
        hidden = call.captured["hidden"]  # (B, L, H), the attention's (normed) input
        cos, sin = call.captured["position_embeddings"]
        batch, length, _ = hidden.shape
        if length != call.image_mask.shape[1]:
            raise PrumergeError("fastv: the first forward pass must see the whole prompt")
        head_dim = attention.head_dim
        query = attention.q_proj(hidden[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
        key = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        query = self.rotary(query, query, cos[:, -1:], sin[:, -1:])[0]
        key = self.rotary(key, key, cos, sin)[0]
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
        logits = (query @ key.transpose(-1, -2)).squeeze(2).float() * attention.scaling  # (B, h, L)
        logits = logits.masked_fill(~call.padding_mask[:, None, :], float("-inf"))
        received = logits.softmax(dim=-1).mean(dim=1)  # (B, L)
        # Rank each image's tokens among themselves; keep the top R of every image.
        positions = call.image_mask.nonzero()[:, 1].view(batch, -1)  # (B, images * N)
        scores = received.gather(1, positions).view(batch, -1, call.tokens_per_image)
        rank = rank_descending(scores.flatten(0, 1)).view_as(scores)
        drop = (rank >= call.keep).view(batch, -1)
        dropped = torch.zeros_like(call.image_mask)
        return dropped.scatter(1, positions, drop)

    # -- the wrapped layers ------------------------------------------------------------
    def _wrap(self, original: Callable[..., Any], first: bool) -> Callable[..., Any]:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self.call
            if call is None:
                return original(hidden_states, *args, **kwargs)
            if first:
                # Layer K starts every forward pass: it decides what this pass drops and
                # the later layers reuse its plan on their (already shorter) inputs.
                if call.dropped is None:
                    call.dropped = self._select(call)
                    call.captured.clear()
                call.plan = _plan(hidden_states, kwargs, call.dropped)
                hidden_states = call.plan.take_rows(hidden_states)
            elif call.plan is None:
                raise PrumergeError("fastv: layer K did not run before the later layers")
            return original(hidden_states, *args, **call.plan.apply(kwargs))

        return forward


@dataclass
class _Plan:
    """Which query rows and key columns of one forward pass survive in layers >= K."""

    keep_rows: torch.Tensor | None  # (B, q') indices into the pass's q_len rows; None: all
    keep_columns: torch.Tensor  # (B, kv') indices into the kv_len columns of the mask
    q_len: int
    kv_len: int

    def take_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.keep_rows is None:
            return tensor
        batch = self.keep_rows.shape[0]
        tensor = tensor.expand(batch, *tensor.shape[1:])
        index = self.keep_rows[..., None].expand(-1, -1, tensor.shape[-1])
        return tensor.gather(1, index)

    def apply(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if self.keep_rows is not None:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (self.take_rows(cos), self.take_rows(sin))
            position_ids = kwargs.get("position_ids")
            if position_ids is not None and position_ids.shape[-1] == self.q_len:
                kwargs["position_ids"] = position_ids.expand(self.keep_rows.shape[0], -1).gather(
                    1, self.keep_rows
                )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            # (B, 1, q, kv): keep the surviving query rows and key columns.
            batch = self.keep_columns.shape[0]
            mask = mask.expand(batch, -1, -1, -1)
            if mask.shape[-1] == self.kv_len:
                cols = self.keep_columns[:, None, None, :]
                mask = mask.gather(3, cols.expand(-1, mask.shape[1], mask.shape[2], -1))
            if self.keep_rows is not None and mask.shape[2] == self.q_len:
                rows = self.keep_rows[:, None, :, None]
                mask = mask.gather(2, rows.expand(-1, mask.shape[1], -1, mask.shape[3]))
            kwargs["attention_mask"] = mask
        return kwargs


def _plan(hidden: torch.Tensor, kwargs: dict[str, Any], dropped: torch.Tensor) -> _Plan:
    """Plan a forward pass whose full-length inputs reach layer K."""
    batch, q_len, _ = hidden.shape
    mask = kwargs.get("attention_mask")
    # transformers 5.23 passes the cache as past_key_values, later releases as cache.
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if isinstance(mask, torch.Tensor) and mask.ndim == 4:
        total = mask.shape[-1]  # (B, 1, q, kv): kv is the whole sequence so far
    else:
        # Layer 0 has already stored this pass's keys, so its cache length is the total.
        total = cache.get_seq_length(0) if cache is not None else 0
    total = max(total, q_len)  # without a cache, the inputs are the whole sequence
    start = total - q_len
    prompt_len = min(dropped.shape[1], total)
    full = torch.zeros(batch, total, dtype=torch.bool, device=hidden.device)
    full[:, :prompt_len] = dropped[:, :prompt_len]
    keep_columns = (~full).nonzero()[:, 1].view(batch, -1)
    rows = ~full[:, start:]
    keep_rows = None if bool(rows.all()) else rows.nonzero()[:, 1].view(batch, -1)
    return _Plan(keep_rows=keep_rows, keep_columns=keep_columns, q_len=q_len, kv_len=total)


def _rotary_function(attention: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    module = inspect.getmodule(type(attention))
    function = getattr(module, "apply_rotary_pos_emb", None)
    if function is None or not all(
        hasattr(attention, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")
    ):
        raise PrumergeError(
            f"fastv supports LLaMA-style attention with rotary embeddings; got {type(attention).__name__}"
        )
    return function
