"""PyramidDrop's patch: stages at ``layers``, each ranked by the last prompt token's attention
recomputed with the stage layer's own q/k (on its input norm of the hidden states), on the
shared mechanism of ``prumerge.adapters.pruning``."""

from __future__ import annotations

import torch
from torch import nn

from prumerge.adapters.llm import register_language_patch
from prumerge.adapters.llm_attention import attention_scores
from prumerge.adapters.pruning import StagedPruning, StageView, uses_mrope
from prumerge.errors import PrumergeError
from prumerge.methods import LanguageMethod


@register_language_patch("pdrop")
class PyramidDropPatch(StagedPruning):
    def __init__(self, language_model: nn.Module, method: LanguageMethod) -> None:
        layers = getattr(language_model, "layers", None)
        depth = len(layers) if isinstance(layers, nn.ModuleList) else 0
        if depth and method.keep is None and method.layers[-1] >= depth:
            raise PrumergeError(
                f"pdrop layers {list(method.layers)} must be below the decoder's {depth} layers; "
                f"pass layers=..."
            )
        self.method = method
        self.layer = method.layer
        self.compact_positions = method.positions == "compact" and not uses_mrope(language_model)
        super().__init__(language_model, method)

    def schedule(self, count: int) -> list[tuple[int, int]]:
        try:
            return self.method.schedule(count, len(self.layers))
        except ValueError as error:
            raise PrumergeError(str(error)) from None

    def score(self, view: StageView) -> torch.Tensor:
        layer = self.layers[view.layer]
        normed = layer.input_layernorm(view.hidden)
        weights = attention_scores(
            layer.self_attn,
            self.rotary,
            normed,
            view.position_embeddings,
            view.last[:, None],
            view.real[:, None, :],  # the last token sees every real token
        )
        return weights[:, :, 0].mean(dim=1)  # (B, Lc)
