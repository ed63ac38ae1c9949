"""VisPruner: important patches by [CLS] attention plus diverse ones (``prumerge.ops.vispruner``)."""

from __future__ import annotations

from prumerge.methods.base import (
    IMPORTANCE_CHOICES,
    VisionInputs,
    VisionMethod,
    check_choice,
    check_float,
    check_int,
    check_keep,
    register_method,
)
from prumerge.ops import Reduction
from prumerge.ops.vispruner import DEDUP_ROUND, vispruner


@register_method("vispruner")
class VisPruner(VisionMethod):
    """VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for
    Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 v2), as its released code
    computes it.

    Of a budget of T tokens, int(T * important_ratio) are the patches with the highest [CLS]
    attention of the layer that outputs the selected features (``attentions[-2]`` on
    LLaVA-1.5, averaged over heads, as FasterVLM); the rest are chosen among the other
    patches by removing, in rounds of at most 8, those most cosine-similar (tower features,
    before the projector) to others. Kept patches go to the LLM unchanged, in raster order.
    Towers without [CLS] use the mean attention each patch receives (``importance="mean"``).
    The release's code default ``important_ratio=0.5`` (its README also runs 0.75 at 64).
    """

    needs_attention = True
    # The release reads ``attentions[-2]``: the layer that outputs the selected features.
    attention_source = "producer"

    def __init__(
        self,
        keep: int | float = 64,
        important_ratio: float = 0.5,
        round_size: int = DEDUP_ROUND,
        importance: str = "auto",
    ) -> None:
        self.keep = check_keep(keep)
        self.important_ratio = check_float(
            "important_ratio", important_ratio, minimum=0.0, maximum=1.0
        )
        self.round_size = check_int("round_size", round_size, minimum=1)
        self.importance = check_choice("importance", importance, IMPORTANCE_CHOICES)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        if inputs.cls_attn is None:
            raise ValueError(
                f"method {self.name!r} needs the importance; VisionInputs.cls_attn is None"
            )
        return vispruner(
            inputs.features,
            inputs.cls_attn,
            keep=self.budget_for(inputs),
            important_ratio=self.important_ratio,
            round_size=self.round_size,
        )

    def describe_budget(self) -> str:
        return (
            "output tokens: important patches by importance plus diverse ones (duplicates "
            "removed), unchanged"
        )
