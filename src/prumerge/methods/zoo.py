"""The peers users compare PruMerge against: random, pool, downsample, cls_topk, visionzip,
tome, divprune.

Every method here takes ``keep``, the number of output tokens the LLM sees per image (an int
count, or a float ratio of the N patches), and returns all N tokens unchanged when keep >= N.
"""

from __future__ import annotations

from prumerge.methods.base import (
    FEATURE_SPACES,
    IMPORTANCE_CHOICES,
    VisionInputs,
    VisionMethod,
    check_choice,
    check_int,
    check_keep,
    register_method,
)
from prumerge.ops import (
    Reduction,
    budget_count,
    cls_topk,
    divprune,
    full_reduction,
    pooled_grid,
    random_sample,
    spatial_pool,
    tome,
    visionzip,
)
from prumerge.ops.visionzip import PAPER_CONTEXTUAL_FRACTION, contextual_count


def _require(inputs: VisionInputs, method: str, *, keys: bool = False, attn: bool = False) -> None:
    if keys and inputs.keys is None:
        raise ValueError(f"method {method!r} needs the patch keys; VisionInputs.keys is None")
    if attn and inputs.cls_attn is None:
        raise ValueError(
            f"method {method!r} needs the [CLS] attention; VisionInputs.cls_attn is None"
        )


@register_method("random")
class RandomSample(VisionMethod):
    """Uniformly random patches, seeded: the honest floor every method must beat.

    Each image draws from its own stream, keyed by ``seed`` and the image's features, so the
    sample is reproducible, differs between images and seeds, and does not depend on the rest
    of the batch. See ``prumerge.ops.random_sample``.
    """

    def __init__(self, keep: int | float = 64, seed: int = 0) -> None:
        self.keep = check_keep(keep)
        self.seed = check_int("seed", seed, minimum=0, maximum=2**32 - 1)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return random_sample(inputs.features, keep=self.budget_for(inputs), seed=self.seed)

    def describe_budget(self) -> str:
        return "output tokens: uniformly random patches, unchanged"


@register_method("pool")
class SpatialPool(VisionMethod):
    """Average pooling of the patch grid (2x2 pooling gives 144 of 576, 3x3 gives 64).

    A budget that is no perfect pooling factor pools adaptively to the closest grid with at
    most ``keep`` cells and an aspect ratio near the patch grid's, so an image can get fewer
    tokens than ``keep`` (30 for keep=32 on 24x24). See ``prumerge.ops.spatial_pool``.
    """

    def __init__(self, keep: int | float = 64) -> None:
        self.keep = check_keep(keep)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return spatial_pool(inputs.features, keep=self.budget_for(inputs), grid=inputs.grid)

    def describe_budget(self) -> str:
        return "at most `keep` output tokens: the cells of the largest pooled grid that fits"


@register_method("cls_topk")
class ClsTopK(VisionMethod):
    """Top-k patches by [CLS] attention, no merging (FasterVLM: Zhang et al., arXiv 2412.01818).

    See ``prumerge.ops.cls_topk``; the keys only decide which kept patch each dropped patch is
    drawn as belonging to.
    """

    needs_attention = True

    def __init__(self, keep: int | float = 64, importance: str = "auto") -> None:
        self.keep = check_keep(keep)
        self.importance = check_choice("importance", importance, IMPORTANCE_CHOICES)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, attn=True)
        assert inputs.cls_attn is not None
        return cls_topk(
            inputs.features, inputs.cls_attn, keys=inputs.keys, keep=self.budget_for(inputs)
        )

    def describe_budget(self) -> str:
        return "output tokens: the patches with the highest importance, unchanged"


@register_method("visionzip")
class VisionZip(VisionMethod):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
    Language Models", CVPR 2025, arXiv 2412.04467).

    Dominant patches by [CLS] attention, plus contextual tokens: the remaining patches merged
    (plain mean) into evenly spaced centres by key similarity. ``contextual`` is a count or a
    fraction of the budget; the default 10/64 is the paper's split (54 + 10 of 64, 108 + 20 of
    128, 162 + 30 of 192). See ``prumerge.ops.visionzip``.
    """

    needs_attention = True
    # The released VisionZip code reads the attention of the layer that outputs the selected
    # features (layer -2 for LLaVA-1.5), not of the layer that consumes them.
    attention_source = "producer"

    def __init__(
        self,
        keep: int | float = 64,
        contextual: int | float = PAPER_CONTEXTUAL_FRACTION,
        importance: str = "auto",
    ) -> None:
        self.keep = check_keep(keep)
        contextual_count(contextual, 1)  # validates
        self.contextual = contextual
        self.importance = check_choice("importance", importance, IMPORTANCE_CHOICES)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, keys=True, attn=True)
        assert inputs.keys is not None and inputs.cls_attn is not None
        return visionzip(
            inputs.features,
            inputs.keys,
            inputs.cls_attn,
            keep=self.budget_for(inputs),
            contextual=self.contextual,
        )

    def describe_budget(self) -> str:
        return "output tokens: dominant patches (by importance) plus contextual (merged) tokens"


@register_method("tome")
class ToMe(VisionMethod):
    """ToMe bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster",
    ICLR 2023, arXiv 2210.09461), repeated on the selected layer's tokens until ``keep`` remain.

    Size-weighted merges, with the keys as the similarity metric; ``r`` caps the merges per
    round (None: half the tokens per round). See ``prumerge.ops.tome``.
    """

    needs_attention = True  # for the keys

    def __init__(self, keep: int | float = 64, r: int | None = None) -> None:
        self.keep = check_keep(keep)
        self.r = None if r is None else check_int("r", r, minimum=1)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, keys=True)
        assert inputs.keys is not None
        return tome(inputs.features, inputs.keys, keep=self.budget_for(inputs), r=self.r)

    def describe_budget(self) -> str:
        return "output tokens: size-weighted means of merged groups of patches"


@register_method("divprune")
class DivPrune(VisionMethod):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025, arXiv 2503.02175).

    Greedy max-min diverse subset of the patches under cosine distance, starting from the most
    isolated patch. As in the released code, it selects on the projector's outputs (the LLM's
    input embeddings: ``space="projected"``); ``space="tower"`` selects on the tower's
    features before the projector instead. See ``prumerge.ops.divprune``.
    """

    def __init__(self, keep: int | float = 64, space: str = "projected") -> None:
        self.keep = check_keep(keep)
        self.space = check_choice("space", space, FEATURE_SPACES)
        self.feature_space = self.space

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return divprune(inputs.features, keep=self.budget_for(inputs))

    def describe_budget(self) -> str:
        return "output tokens: a max-min diverse subset of the patches, unchanged"


@register_method("downsample")
class Downsample(VisionMethod):
    """Plain image downsampling: the vision tower runs on the image resized so that its patch
    grid has at most ``keep`` cells, and every one of its tokens goes to the LLM.

    Benchmark studies find this baseline matching or beating many published reduction
    methods, so it sits beside ``random`` and ``pool``. The grid is ``pool``'s (the largest
    grid within the budget with nearly the tower's aspect ratio: 12x12 for 144 of 24x24), and
    the image is resized with antialiased bilinear interpolation; towers with fixed position
    embeddings interpolate them (``interpolate_pos_encoding``). Qwen2-VL/2.5-VL's grid is in
    merged tokens, and the image's 3-D rope indices are those of the smaller image.
    """

    resizes_input = True

    def __init__(self, keep: int | float = 64) -> None:
        self.keep = check_keep(keep)

    def target_grid(self, rows: int, cols: int) -> tuple[int, int]:
        budget = budget_count(self.keep, rows * cols)
        if budget >= rows * cols:
            return rows, cols
        return pooled_grid(rows, cols, budget)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        # The tower already ran on the resized image: every token it made is kept.
        return full_reduction(inputs.features)

    def describe_budget(self) -> str:
        return "at most `keep` tokens: the patch grid of the resized image"
