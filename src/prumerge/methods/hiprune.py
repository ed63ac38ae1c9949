"""HiPrune: hierarchical ViT attention, middle-layer anchors and deep-layer registers
(``prumerge.ops.hiprune``)."""

from __future__ import annotations

from typing import ClassVar

from prumerge.methods.base import (
    VisionInputs,
    VisionMethod,
    check_choice,
    check_float,
    check_int,
    check_keep,
    register_method,
)
from prumerge.ops import Reduction
from prumerge.ops.hiprune import BUFFER_MODES, hiprune


@register_method("hiprune")
class HiPrune(VisionMethod):
    """HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical
    Attention in Vision-Language Models", arXiv 2508.00553), as its released code computes it.

    The "global attention" of a layer is the attention each patch receives, averaged over
    heads and over every query ([CLS] included). Anchors: the round(T * alpha / 5) patches
    with the most global attention in encoder layer ``object_layer`` (1-based: the release's
    ``attentions[l - 1]``, l = 9); buffers: each anchor's neighbours at -1, +1, -cols, +cols;
    registers: the rest of the budget by global attention of the layer that outputs the
    selected features (``attentions[-2]`` on LLaVA-1.5). Kept patches go to the LLM
    unchanged, in raster order. The release divides its budget by the batch size; here every
    image gets ``keep`` (docs/methods.md). ``buffers="grid"`` keeps buffers inside the grid
    (the release wraps across rows and clamps at the edges).
    """

    needs_attention = True
    # Both layers' signal is the mean attention received (the release's "global attention").
    importance = "mean"
    # The deep (register) layer: the one that outputs the selected features.
    attention_source: ClassVar[str] = "producer"

    def __init__(
        self,
        keep: int | float = 64,
        alpha: float = 0.1,
        object_layer: int = 9,
        buffers: str = "release",
    ) -> None:
        self.keep = check_keep(keep)
        self.alpha = check_float("alpha", alpha, minimum=0.0, maximum=5.0)
        self.object_layer = check_int("object_layer", object_layer, minimum=1)
        self.buffers = check_choice("buffers", buffers, BUFFER_MODES)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        if inputs.cls_attn is None or inputs.object_importance is None:
            raise ValueError(
                f"method {self.name!r} needs the mean attention of two tower layers; "
                f"VisionInputs.cls_attn or object_importance is None"
            )
        return hiprune(
            inputs.features,
            inputs.object_importance,
            inputs.cls_attn,
            keep=self.budget_for(inputs),
            alpha=self.alpha,
            grid=inputs.grid,
            buffers=self.buffers,
        )

    def describe_budget(self) -> str:
        return (
            "output tokens: middle-layer anchors and their neighbours, then deep-layer "
            "registers, unchanged"
        )
