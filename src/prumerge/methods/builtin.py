"""The built-in methods: none, prumerge, prumerge+, and fastv (LLM-side)."""

from __future__ import annotations

from prumerge.methods.base import (
    IMPORTANCE_CHOICES,
    LanguageMethod,
    VisionInputs,
    VisionMethod,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_keep,
    register_method,
)
from prumerge.ops import Reduction, full_reduction, prumerge
from prumerge.ops.prumerge import SPATIAL_MODES


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

    Keeps the patches whose importance ([CLS] attention, or the mean attention received with
    ``importance="mean"``) is an IQR outlier (adaptive, per image) or a fixed budget, and
    merges the pruned patches into them by key similarity. Options are those of
    ``prumerge.ops.prumerge``; ``attention="reference"`` uses the released code's single-head
    [CLS] attention.
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
        importance: str = "auto",
    ) -> None:
        self.keep = check_keep(keep, adaptive=True)
        self.knn = check_int("knn", knn, minimum=0)
        # A command line's "merge=none" may arrive as None: it means the mode "none".
        self.merge = check_choice(
            "merge", "none" if merge is None else merge, ("sum", "mean", "none")
        )
        self.supplement = check_bool("supplement", supplement)
        self.whisker = check_float("whisker", whisker, minimum=0.0)
        self.min_keep = check_int("min_keep", min_keep, minimum=1)
        self.uniform_factor = check_float("uniform_factor", uniform_factor, minimum=0.0)
        self.order = check_choice("order", order, ("raster", "attention"))
        self.attention = check_choice("attention", attention, ("multihead", "reference"))
        self.attention_mode = attention
        self.importance = check_choice("importance", importance, IMPORTANCE_CHOICES)
        if attention == "reference" and importance == "mean":
            raise ValueError(
                "attention='reference' is the released code's [CLS] attention; it cannot be "
                "combined with importance='mean'"
            )

    def reduce(self, inputs: VisionInputs) -> Reduction:
        if inputs.keys is None or inputs.cls_attn is None:
            raise ValueError(f"method {self.name!r} needs the patch keys and importance")
        return prumerge(
            inputs.features,
            inputs.keys,
            inputs.cls_attn,
            keep=self.budget_for(inputs),
            knn=self.knn,
            plus=self.plus,
            grid=inputs.grid,
            supplement=self.supplement,
            merge=self.merge,  # type: ignore[arg-type]
            whisker=self.whisker,
            min_keep=self.min_keep,
            uniform_factor=self.uniform_factor,
            order=self.order,  # type: ignore[arg-type]
            spatial=getattr(self, "spatial", "stride"),  # type: ignore[arg-type]
        )

    def describe_budget(self) -> str:
        if self.keep is None:
            return "adaptive: IQR outliers of the importance, plus one supplement token"
        return "output tokens, the supplement token included"


@register_method("prumerge+")
class PruMergePlus(PruMerge):
    """LLaVA-PruMerge+ (same paper): PruMerge plus spatial samples of the patches.

    ``spatial="stride"`` (default) is the released rule: every s-th patch in raster order,
    s = int(int(N / outliers) / 3), minus the patches already kept, generalised to any N
    and batch (a real-valued stride where the release's s would be 0, a crash, or 1, every
    patch); with a fixed budget the samples are evenly spaced in raster order among the
    patches left. ``spatial="grid"`` is a farthest-point order of the grid cells. See
    ``prumerge.ops.prumerge`` and docs/methods.md.
    """

    plus = True

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
        importance: str = "auto",
        spatial: str = "stride",
    ) -> None:
        super().__init__(
            keep=keep,
            knn=knn,
            merge=merge,
            supplement=supplement,
            whisker=whisker,
            min_keep=min_keep,
            uniform_factor=uniform_factor,
            order=order,
            attention=attention,
            importance=importance,
        )
        self.spatial = check_choice("spatial", spatial, SPATIAL_MODES)

    def describe_budget(self) -> str:
        if self.keep is None:
            sampler = "every s-th patch in raster order" if self.spatial == "stride" else "grid"
            return (
                f"adaptive: IQR outliers of the importance, plus about {self.uniform_factor:g} "
                f"spatial samples ({sampler}) per outlier, plus one supplement token"
            )
        return (
            f"output tokens: importance picks and spatial samples split 1 : "
            f"{self.uniform_factor:g}, the supplement token included"
        )


@register_method("fastv")
class FastV(LanguageMethod):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

    Prunes image tokens inside the LLM: layers 0..K-1 see all N tokens of every image, and
    from layer K on each image keeps the ``keep`` tokens that received the most attention
    from the prompt's last token in layer K-1. The vision side is unchanged.
    """

    def __init__(self, keep: int | float = 0.5, layer: int = 2) -> None:
        self.keep = check_keep(keep)
        self.layer = check_int("layer", layer, minimum=1)

    def describe_budget(self) -> str:
        return (
            f"image tokens kept per image from LLM layer {self.layer} on (earlier layers see all N)"
        )
