"""DART's patch: one stage at layer K, by duplication against pivot tokens
(``prumerge.ops.duplication``), on the shared mechanism of ``prumerge.adapters.pruning``.

It reads layer K-1's keys after the rotary embedding (recomputed from that attention
module's captured input) and layer K-1's output through the decoder's final norm, as the
release does; no attention weights."""

from __future__ import annotations

import torch
from torch import nn

from prumerge.adapters.llm import register_language_patch
from prumerge.adapters.pruning import StagedPruning, StageView
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod
from prumerge.ops.duplication import pivot_duplication_keep
from prumerge.ops.select import budget_count


@register_language_patch("dart")
class DARTPatch(StagedPruning):
    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        layers = getattr(language_model, "layers", None)
        count = len(layers) if isinstance(layers, nn.ModuleList) else 0
        if count and not 1 <= method.layer < count:
            raise PrumergeError(f"dart layer K={method.layer} must be in 1..{count - 1}")
        if not hasattr(language_model, "norm"):
            raise PrumergeError(
                f"dart needs the decoder's final norm (.norm); got {type(language_model).__name__}"
            )
        self.layer = method.layer
        self.capture_layers = (method.layer - 1,)
        self.keep = method.keep
        self.image_pivots = method.image_pivots
        self.text_pivots = method.text_pivots
        super().__init__(language_model, method)

    def schedule(self, count: int) -> list[tuple[int, int]]:
        return [(self.layer, budget_count(self.keep, count))]

    def score(self, view: StageView) -> torch.Tensor:
        attention = self.layers[self.layer - 1].self_attn
        captured = view.captured[self.layer - 1]
        batch, length = view.rows.shape
        hidden = captured.hidden.expand(batch, *captured.hidden.shape[1:])
        key = attention.k_proj(hidden).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        cos, sin = captured.position_embeddings
        key = self.rotary(key, key, cos, sin)[0]  # (B, kv_heads, L, D), after RoPE
        keys = key.transpose(1, 2).reshape(batch, length, -1)  # heads side by side
        states = self.language_model.norm(view.hidden)  # layer K-1's output, final-normed
        score = torch.zeros(batch, length, device=view.hidden.device)
        for image in torch.unique(view.image[view.image >= 0]).tolist():
            row = int((view.image == image).any(dim=1).nonzero()[0])
            mine = (view.image[row] == image).nonzero().flatten()
            after = torch.arange(length, device=mine.device) > mine[-1]
            text = (after & view.real[row] & (view.image[row] < 0)).nonzero().flatten()
            positions = view.ordinal[row]  # as in the unpadded prompt
            kept = pivot_duplication_keep(
                keys[row, mine],
                keys[row, text],
                states[row, mine],
                states[row, text],
                int(view.keep[image]),
                image_pivots=self.image_pivots,
                text_pivots=self.text_pivots,
                image_positions=positions[mine].tolist(),
                text_positions=positions[text].tolist(),
            )
            score[row, mine] = kept.float()
        return score
