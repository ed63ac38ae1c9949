"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) on any
decoder with LLaMA-style layers (LLaMA, Mistral, Qwen2, Qwen2.5-VL's M-RoPE decoder).

FastV prunes image tokens inside the language model: layers 0..K-1 see every token; from
layer K on, each image keeps only the R tokens that received the most attention from the
prompt's last real token in layer K-1. Dropped tokens are removed from the hidden states, the
rotary position embeddings, the attention mask and the KV cache of layers >= K, so the later
layers really run on the shorter sequence; kept tokens keep their original positions.

Rows may drop different numbers of tokens (images of different sizes, different image counts
per row): the shorter rows of layers >= K are then padded at the front with copies of their
last real token, whose key columns are masked for every query, so each row's result does not
depend on the others.

The attention is computed here from the inputs of layer K-1's attention module (captured by a
scoped pre-hook), for one query per row, so the model can run with eager, sdpa or flash
attention, with a 4-D, 2-D or no attention mask, and with left or right padding. The choice is
made once per call, at its first forward pass, and reused by later steps, with or without the
KV cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prumerge.adapters.llm import LanguagePatch, register_language_patch
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod
from prumerge.ops.select import budget_count

_MISSING = object()


@dataclass
class _Call:
    """State of one generate (or forward) call."""

    image: torch.Tensor  # (B, L) image of each prompt token, -1 elsewhere
    padding_mask: torch.Tensor  # (B, L) True for real tokens
    kept: torch.Tensor  # (I,) tokens each image keeps
    captured: dict[str, Any]
    dropped: torch.Tensor | None = None  # (B, L) prompt positions removed from layers >= K
    plan: _Plan | None = None  # the current forward pass's rows and columns


@register_language_patch("fastv")
class FastVPatch(LanguagePatch):
    """Wraps the decoder layers >= K of one language model instance."""

    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        layers = getattr(language_model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise PrumergeError(
                f"fastv needs a LLaMA-style decoder with .layers; got {type(language_model).__name__}"
            )
        layer = method.layer
        if not 1 <= layer < len(layers):
            raise PrumergeError(f"fastv layer K={layer} must be in 1..{len(layers) - 1}")
        attention = layers[layer - 1].self_attn
        self.rotary = _rotary_function(attention)
        self.layers = layers
        self.layer = layer
        self.keep = method.keep
        self.call: _Call | None = None
        self._saved = [vars(layers[i]).get("forward", _MISSING) for i in range(layer, len(layers))]
        for index in range(layer, len(layers)):
            module = layers[index]
            module.forward = self._wrap(module.forward, first=index == layer)
        self._hook = attention.register_forward_pre_hook(self._capture, with_kwargs=True)

    def remove(self) -> None:
        for index, saved in zip(range(self.layer, len(self.layers)), self._saved, strict=True):
            module = self.layers[index]
            if saved is _MISSING:
                vars(module).pop("forward", None)
            else:
                module.forward = saved  # accelerate's hooked forward, for example
        self._hook.remove()

    # -- per call ----------------------------------------------------------------------
    def arm(self, image: torch.Tensor, padding_mask: torch.Tensor) -> list[int]:
        images = int(image.max()) + 1 if image.numel() else 0
        counts = torch.bincount(image[image >= 0], minlength=images)  # (I,)
        kept = [budget_count(self.keep, int(n)) for n in counts.tolist()]
        self.call = _Call(
            image=image,
            padding_mask=padding_mask,
            kept=torch.tensor(kept, dtype=torch.long, device=image.device),
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
        if length != call.image.shape[1]:
            raise PrumergeError("fastv: the first forward pass must see the whole prompt")
        device = hidden.device
        image = call.image.to(device)
        padding = call.padding_mask.to(device)
        # The last real token of every row (left or right padding).
        positions = torch.arange(length, device=device)
        last = torch.where(padding, positions, -1).max(dim=1).values  # (B,)
        rows = torch.arange(batch, device=device)
        head_dim = attention.head_dim
        query = attention.q_proj(hidden[rows, last][:, None])  # (B, 1, h*D)
        query = query.view(batch, 1, -1, head_dim).transpose(1, 2)  # (B, h, 1, D)
        key = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
        query = self.rotary(query, query, cos[rows, last][:, None], sin[rows, last][:, None])[0]
        key = self.rotary(key, key, cos, sin)[0]
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
        logits = (query @ key.transpose(-1, -2)).squeeze(2).float() * attention.scaling  # (B, h, L)
        logits = logits.masked_fill(~padding[:, None, :], float("-inf"))
        received = logits.softmax(dim=-1).mean(dim=1)  # (B, L)
        # Rank each image's tokens among themselves (highest attention first, ties to the
        # earlier token) and drop all but the top kept[i] of image i.
        where = (image >= 0).nonzero()  # (M, 2)
        owner = image[where[:, 0], where[:, 1]]  # (M,)
        score = received[where[:, 0], where[:, 1]]
        by_score = torch.sort(score, descending=True, stable=True).indices
        order = by_score[torch.sort(owner[by_score], stable=True).indices]  # by image, then score
        counts = torch.bincount(owner, minlength=call.kept.shape[0])
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=device) - starts[owner[order]]
        drop = rank >= call.kept.to(device)[owner]
        dropped = torch.zeros(batch, length, dtype=torch.bool, device=device)
        dropped[where[:, 0], where[:, 1]] = drop
        return dropped

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
                call.plan = _plan(hidden_states, kwargs, call.dropped, call.padding_mask)
                hidden_states = call.plan.take_rows(hidden_states)
            elif call.plan is None:
                raise PrumergeError("fastv: layer K did not run before the later layers")
            return original(hidden_states, *args, **call.plan.apply(kwargs))

        return forward


@dataclass
class _Plan:
    """Which query rows and key columns of one forward pass survive in layers >= K.

    Rows that keep fewer tokens than the longest are padded at the front: their extra query
    rows copy the row's last real token, and their extra key columns point at column
    ``kv_len``, a column appended to the mask that no query may attend to.
    """

    keep_rows: torch.Tensor | None  # (B, q') indices into the pass's q_len rows; None: all
    keep_columns: torch.Tensor  # (B, kv') indices into the kv_len columns (kv_len: blocked)
    q_len: int
    kv_len: int
    padded: bool  # some row has blocked columns

    def take_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.keep_rows is None:
            return tensor
        batch = self.keep_rows.shape[0]
        tensor = tensor.expand(batch, *tensor.shape[1:])
        index = self.keep_rows.to(tensor.device)[..., None].expand(-1, -1, tensor.shape[-1])
        return tensor.gather(1, index)

    def apply(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if self.keep_rows is not None:
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (self.take_rows(cos), self.take_rows(sin))
            position_ids = kwargs.get("position_ids")
            if position_ids is not None and position_ids.shape[-1] == self.q_len:
                rows = self.keep_rows.to(position_ids.device)
                kwargs["position_ids"] = position_ids.expand(rows.shape[0], -1).gather(1, rows)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            kwargs["attention_mask"] = self._mask_4d(mask)
        elif isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[-1] == self.kv_len:
            # (B, kv) padding mask (flash attention): keep the surviving columns.
            columns = self.keep_columns.to(mask.device)
            blocked = torch.zeros_like(mask[:, :1])
            kwargs["attention_mask"] = torch.cat([mask, blocked], dim=1).gather(1, columns)
        elif mask is None and self.padded:
            kwargs["attention_mask"] = self._causal_mask()
        return kwargs

    def _mask_4d(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, q, kv): keep the surviving query rows and key columns."""
        batch = self.keep_columns.shape[0]
        mask = mask.expand(batch, -1, -1, -1)
        if mask.shape[-1] == self.kv_len:
            blocked = torch.finfo(mask.dtype).min if mask.is_floating_point() else False
            mask = torch.cat([mask, torch.full_like(mask[..., :1], blocked)], dim=-1)
            cols = self.keep_columns.to(mask.device)[:, None, None, :]
            mask = mask.gather(3, cols.expand(-1, mask.shape[1], mask.shape[2], -1))
        if self.keep_rows is not None and mask.shape[2] == self.q_len:
            rows = self.keep_rows.to(mask.device)[:, None, :, None]
            mask = mask.gather(2, rows.expand(-1, mask.shape[1], -1, mask.shape[3]))
        return mask

    def _causal_mask(self) -> torch.Tensor:
        """A boolean (B, 1, q', kv') causal mask over the original columns, for passes that
        had no mask (sdpa without padding) but now pad some rows."""
        columns = self.keep_columns  # (B, kv')
        start = self.kv_len - self.q_len
        rows = (
            self.keep_rows
            if self.keep_rows is not None
            else torch.arange(self.q_len, device=columns.device).expand(columns.shape[0], -1)
        )
        query_position = (rows + start)[:, :, None]  # (B, q', 1)
        allowed = (columns[:, None, :] <= query_position) & (columns[:, None, :] < self.kv_len)
        return allowed[:, None]


def _plan(
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    dropped: torch.Tensor,
    padding_mask: torch.Tensor,
) -> _Plan:
    """Plan a forward pass whose full-length inputs reach layer K."""
    batch, q_len, _ = hidden.shape
    device = hidden.device
    mask = kwargs.get("attention_mask")
    # transformers 5.23 passes the cache as past_key_values, later releases as cache.
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if isinstance(mask, torch.Tensor) and mask.ndim in (2, 4):
        total = mask.shape[-1]  # (B, [1, q,] kv): kv is the whole sequence so far
    else:
        # Layer 0 has already stored this pass's keys, so its cache length is the total.
        total = cache.get_seq_length(0) if cache is not None else 0
    total = max(total, q_len)  # without a cache, the inputs are the whole sequence
    start = total - q_len
    dropped = dropped.to(device)
    prompt_len = min(dropped.shape[1], total)
    full = torch.zeros(batch, total, dtype=torch.bool, device=device)
    full[:, :prompt_len] = dropped[:, :prompt_len]

    keep_columns = _front_padded(~full, fill=torch.full((batch,), total, device=device))
    rows_kept = ~full[:, start:]
    if bool(rows_kept.all()):
        keep_rows = None
    else:
        # Front padding rows copy the row's last real token of this pass.
        padding = padding_mask.to(device)
        within = torch.arange(q_len, device=device)
        real = (
            padding[:, start:]
            if padding.shape[1] >= total
            else torch.ones(batch, q_len, dtype=torch.bool, device=device)
        )
        last = torch.where(real & rows_kept, within, -1).max(dim=1).values.clamp(min=0)
        keep_rows = _front_padded(rows_kept, fill=last)
    padded = bool(((~full).sum(dim=1) != (~full).sum(dim=1)[0]).any())
    return _Plan(
        keep_rows=keep_rows, keep_columns=keep_columns, q_len=q_len, kv_len=total, padded=padded
    )


def _front_padded(keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, W) indices of the True entries of each row of ``keep``, in order, right-aligned
    to the longest row; rows with fewer entries start with ``fill[b]``."""
    batch, length = keep.shape
    count = keep.sum(dim=1)
    width = int(count.max())
    positions = torch.arange(length, device=keep.device).expand(batch, length)
    order = torch.argsort(torch.where(keep, positions, positions + length), dim=1, stable=True)
    slots = torch.arange(width, device=keep.device).expand(batch, width)
    source = slots - (width - count)[:, None]  # < 0 in the front padding
    taken = order.gather(1, source.clamp(min=0))
    return torch.where(source >= 0, taken, fill[:, None].expand(batch, width))


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
