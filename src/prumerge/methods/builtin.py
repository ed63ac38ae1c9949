"""The built-in methods: none, prumerge, prumerge+."""

from __future__ import annotations

from typing import ClassVar

from prumerge.methods.base import VisionInputs, VisionMethod, register_method
from prumerge.ops import Reduction, full_reduction, prumerge


@register_method("none")
class NoReduction(VisionMethod):
    """All visual tokens pass unchanged: the baseline, and the parity check."""

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return full_reduction(inputs.features)

    def describe_budget(self) -> str:
        return "all N patch tokens"


@register_method("prumerge")
class PruMerge(VisionMethod):
    """LLaVA-PruMerge (Shang et al., ICCV 2025, arXiv 2403.15388).

    Keeps the patches whose [CLS] attention is an IQR outlier (adaptive, per image) or a
    fixed budget, and merges the pruned patches into them by key similarity. Options are
    those of ``prumerge.ops.prumerge``; ``attention="reference"`` uses the released code's
    single-head attention.
    """

    needs_attention = True
    plus = False

    def __init__(
        self,
        keep: int | float | None = None,
        knn: int = 32,
        merge: str = "sum",
        supplement: bool = True,
        whisker: float = 1.5,
        min_keep: int = 1,
        uniform_factor: float = 3.0,
        order: str = "raster",
        attention: str = "multihead",
    ) -> None:
        if attention not in ("multihead", "reference"):
            raise ValueError(f"attention must be 'multihead' or 'reference'; got {attention!r}")
        self.keep = keep
        self.knn = knn
        self.merge = merge
        self.supplement = supplement
        self.whisker = whisker
        self.min_keep = min_keep
        self.uniform_factor = uniform_factor
        self.order = order
        self.attention = attention
        self.attention_mode = attention

    def reduce(self, inputs: VisionInputs) -> Reduction:
        assert inputs.keys is not None and inputs.cls_attn is not None
        return prumerge(
            inputs.features,
            inputs.keys,
            inputs.cls_attn,
            keep=self.keep,
            knn=self.knn,
            plus=self.plus,
            grid=inputs.grid,
            supplement=self.supplement,
            merge=self.merge,  # type: ignore[arg-type]
            whisker=self.whisker,
            min_keep=self.min_keep,
            uniform_factor=self.uniform_factor,
            order=self.order,  # type: ignore[arg-type]
        )

    def describe_budget(self) -> str:
        if self.keep is None:
            return "adaptive: IQR outliers of [CLS] attention, plus one supplement token"
        return "output tokens, the supplement token included"


@register_method("prumerge+")
class PruMergePlus(PruMerge):
    """LLaVA-PruMerge+ (same paper): PruMerge plus spatially uniform samples of the grid."""

    plus = True


@register_method("fastv")
class FastV(VisionMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    Prunes image tokens inside the LLM: layers 0..K-1 see all N tokens of every image, and
    from layer K on each image keeps the ``keep`` tokens that received the most attention
    from the prompt's last token in layer K-1. The vision side is unchanged.
    """

    #: The adapter prunes inside the language model instead of before the projector.
    inside_llm: ClassVar[bool] = True

    def __init__(self, keep: int | float = 0.5, layer: int = 2) -> None:
        self.keep = keep
        self.layer = layer

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return full_reduction(inputs.features)

    def describe_budget(self) -> str:
        return (
            f"image tokens kept per image from LLM layer {self.layer} on (earlier layers see all N)"
        )
