"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) on any
decoder with LLaMA-style layers (LLaMA, Mistral, Qwen2, Qwen2.5-VL's M-RoPE decoder).

One stage: layers 0..K-1 see every token; from layer K on, each image keeps only the R tokens
that received the most attention from the prompt's last real token in layer K-1, computed
from layer K-1's attention inputs for that one query. The dropping itself is the shared
mechanism of ``prumerge.adapters.pruning``.
"""

from __future__ import annotations

import torch
from torch import nn

from prumerge.adapters.llm import register_language_patch
from prumerge.adapters.llm_attention import attention_scores
from prumerge.adapters.pruning import StagedPruning, StageView
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod
from prumerge.ops.select import budget_count


@register_language_patch("fastv")
class FastVPatch(StagedPruning):
    """FastV's one stage at layer K, ranked by the last token's attention in layer K-1."""

    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        layers = getattr(language_model, "layers", None)
        count = len(layers) if isinstance(layers, nn.ModuleList) else 0
        if count and not 1 <= method.layer < count:
            raise PrumergeError(f"fastv layer K={method.layer} must be in 1..{count - 1}")
        self.layer = method.layer
        self.capture_layers = (method.layer - 1,)
        self.keep = method.keep
        super().__init__(language_model, method)

    def schedule(self, count: int) -> list[tuple[int, int]]:
        return [(self.layer, budget_count(self.keep, count))]

    def score(self, view: StageView) -> torch.Tensor:
        index = self.layer - 1
        captured = view.captured[index]
        batch = view.rows.shape[0]
        key_mask = view.real[:, None, :]  # the last token sees every real token
        weights = attention_scores(
            self.layers[index].self_attn,
            self.rotary,
            captured.hidden.expand(batch, *captured.hidden.shape[1:]),
            captured.position_embeddings,
            view.last[:, None],
            key_mask,
        )
        return weights[:, :, 0].mean(dim=1)  # (B, L) attention received, head mean
