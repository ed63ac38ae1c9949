"""ToMe inside the ViT towers of the LLaVA family (CLIP, DINOv2, SigLIP), as the released ToMe
code patches a timm ViT (``tome/patch/timm.py``): every encoder layer that produces the
selected features runs as ToMe's block, on one model instance, for one call.

A patched layer runs its attention with proportional attention (log of each token's size
added to every query's logits for that key), adds the residual, merges the ``schedule[l]``
tokens the bipartite matching of its own keys picks (``prumerge.ops.tome``), then runs its
MLP on the shorter sequence. The tower's own forward runs everything else, so its hidden
states hold the merged tokens; the layers after the selected one run unchanged on them (their
outputs are not used). The [CLS] token (DINOv2's and CLIP's first) is protected.

Supported: towers whose layers this module can split around the attention (CLIP and SigLIP's
``layer_norm1, self_attn, layer_norm2, mlp``; DINOv2's ``norm1, attention, layer_scale1,
norm2, mlp, layer_scale2``), without register tokens, with eager or sdpa attention (the size
bias is an additive mask, which flash attention cannot take).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prumerge.methods import TowerMerge
from prumerge.ops import key_head_mean
from prumerge.ops.tome import TokenMerger, bipartite_matching

#: Attention implementations whose masks may be additive float biases.
ADDITIVE_MASK_ATTENTION = ("eager", "sdpa")
_MISSING = object()


@dataclass
class _LayerParts:
    """The pieces of one pre-norm encoder layer, around its attention."""

    norm1: nn.Module
    attention: nn.Module
    key: nn.Module
    scale1: nn.Module | None
    norm2: nn.Module
    mlp: nn.Module
    scale2: nn.Module | None


def _find(module: nn.Module, suffixes: tuple[str, ...]) -> nn.Module | None:
    for name, child in module.named_modules():
        if name.endswith(suffixes):
            return child
    return None


def layer_parts(layer: nn.Module) -> _LayerParts | None:
    """The pieces of a CLIP, SigLIP or DINOv2 encoder layer, or None for another layout."""
    names = dict(layer.named_children())
    if {"layer_norm1", "self_attn", "layer_norm2", "mlp"} <= names.keys():  # CLIP, SigLIP
        attention = names["self_attn"]
        key = getattr(attention, "k_proj", None)
        if key is None:
            return None
        return _LayerParts(
            names["layer_norm1"], attention, key, None, names["layer_norm2"], names["mlp"], None
        )
    if {"norm1", "attention", "layer_scale1", "norm2", "mlp", "layer_scale2"} <= names.keys():
        key = _find(names["attention"], ("k_proj", "key"))
        if key is None:
            return None
        return _LayerParts(
            names["norm1"],
            names["attention"],
            key,
            names["layer_scale1"],
            names["norm2"],
            names["mlp"],
            names["layer_scale2"],
        )
    return None


def unsupported_reason(tower: nn.Module, layers: nn.ModuleList, registers: int) -> str | None:
    """Why ToMe cannot merge inside this tower, or None if it can."""
    if registers:
        return "its register tokens would have to stay first"
    implementation = getattr(getattr(tower, "config", None), "_attn_implementation", "eager")
    if implementation not in ADDITIVE_MASK_ATTENTION:
        return (
            f"{implementation} attention cannot add the size bias of proportional attention; "
            f"supported: {', '.join(ADDITIVE_MASK_ATTENTION)}"
        )
    if any(layer_parts(layer) is None for layer in layers):
        return f"its layers ({type(layers[0]).__name__}) are not split around their attention"
    return None


class ToMeTower:
    """Runs one tower with ToMe merging inside its first ``len(plan.schedule)`` layers.

    Args:
        layers: the tower's encoder layers.
        plan: the method's ``TowerMerge`` (schedule, protected tokens, metric, order).
        num_heads: attention heads, for the keys averaged over heads.
    """

    def __init__(self, layers: nn.ModuleList, plan: TowerMerge, num_heads: int) -> None:
        self.layers = layers
        self.plan = plan
        self.num_heads = num_heads
        self.parts = [layer_parts(layers[i]) for i in range(len(plan.schedule))]

    @contextlib.contextmanager
    def merging(self) -> Iterator[dict[str, TokenMerger]]:
        """Patch the layers for the block; ``state["merger"]`` holds the merges afterwards."""
        state: dict[str, TokenMerger] = {}
        saved = [vars(layer).get("forward", _MISSING) for layer in self.layers]
        try:
            for index, parts in enumerate(self.parts):
                assert parts is not None
                layer = self.layers[index]
                layer.forward = self._layer_forward(parts, self.plan.schedule[index], state)
            yield state
        finally:
            for layer, forward in zip(self.layers, saved, strict=True):
                if forward is _MISSING:
                    vars(layer).pop("forward", None)
                else:
                    layer.forward = forward

    def _layer_forward(self, parts: _LayerParts, r: int, state: dict[str, TokenMerger]) -> Any:
        plan = self.plan

        def forward(
            hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any
        ) -> torch.Tensor:
            x = hidden_states  # (B, t, C)
            merger = state.get("merger")
            if merger is None:
                merger = state["merger"] = TokenMerger(x.shape[0], x.shape[1], x.device)
            mask = attention_mask
            if plan.proportional_attention:
                bias = merger.size.log()[:, None, None, :, 0].to(x.dtype)  # (B, 1, 1, t)
                mask = bias if mask is None else mask + bias
            captured: dict[str, torch.Tensor] = {}
            handle = parts.key.register_forward_hook(
                lambda _m, _i, out: captured.__setitem__("k", out)
            )
            try:
                h = parts.attention(parts.norm1(x), attention_mask=mask, **kwargs)[0]
            finally:
                handle.remove()
            if parts.scale1 is not None:
                h = parts.scale1(h)
            x = x + h  # dropout and drop-path are the identity in eval mode
            if r > 0:
                keys = captured["k"]  # (B, t, C)
                metric = key_head_mean(keys, self.num_heads) if plan.metric == "key_mean" else keys
                matching = bipartite_matching(
                    metric, r, protected=plan.protected, sort_unmerged=plan.protected > 0
                )
                (x,) = merger.merge([x], matching)
            h = parts.mlp(parts.norm2(x))
            if parts.scale2 is not None:
                h = parts.scale2(h)
            return x + h

        return forward
