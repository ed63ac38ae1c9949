"""The peers users compare PruMerge against: random, pool, cls_topk, visionzip, tome, divprune.

Every method here takes ``keep``, the number of output tokens the LLM sees per image (an int
count, or a float ratio of the N patches), and returns all N tokens unchanged when keep >= N.
"""

from __future__ import annotations

from prumerge.methods.base import VisionInputs, VisionMethod, register_method
from prumerge.ops import (
    Reduction,
    budget_count,
    cls_topk,
    divprune,
    random_sample,
    spatial_pool,
    tome,
    visionzip,
)
from prumerge.ops.visionzip import PAPER_CONTEXTUAL_FRACTION, contextual_count


def _checked_keep(keep: int | float) -> int | float:
    """``keep`` after the checks of ``budget_count`` (fail at build time, not at reduce time)."""
    budget_count(keep, 1)
    return keep


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
        self.keep = _checked_keep(keep)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2^32); got {seed!r}")
        self.seed = seed

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return random_sample(inputs.features, keep=self.keep, seed=self.seed)

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
        self.keep = _checked_keep(keep)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return spatial_pool(inputs.features, keep=self.keep, grid=inputs.grid)

    def describe_budget(self) -> str:
        return "at most `keep` output tokens: the cells of the largest pooled grid that fits"


@register_method("cls_topk")
class ClsTopK(VisionMethod):
    """Top-k patches by [CLS] attention, no merging (FasterVLM: Zhang et al., arXiv 2412.01818).

    See ``prumerge.ops.cls_topk``; the keys only decide which kept patch each dropped patch is
    drawn as belonging to.
    """

    needs_attention = True

    def __init__(self, keep: int | float = 64) -> None:
        self.keep = _checked_keep(keep)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, attn=True)
        assert inputs.cls_attn is not None
        return cls_topk(inputs.features, inputs.cls_attn, keys=inputs.keys, keep=self.keep)

    def describe_budget(self) -> str:
        return "output tokens: the patches with the highest [CLS] attention, unchanged"


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
        self, keep: int | float = 64, contextual: int | float = PAPER_CONTEXTUAL_FRACTION
    ) -> None:
        self.keep = _checked_keep(keep)
        contextual_count(contextual, 1)  # validates
        self.contextual = contextual

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, keys=True, attn=True)
        assert inputs.keys is not None and inputs.cls_attn is not None
        return visionzip(
            inputs.features,
            inputs.keys,
            inputs.cls_attn,
            keep=self.keep,
            contextual=self.contextual,
        )

    def describe_budget(self) -> str:
        return "output tokens: dominant patches plus contextual (merged) tokens"


@register_method("tome")
class ToMe(VisionMethod):
    """ToMe bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster",
    ICLR 2023, arXiv 2210.09461), repeated on the selected layer's tokens until ``keep`` remain.

    Size-weighted merges, with the keys as the similarity metric; ``r`` caps the merges per
    round (None: half the tokens per round). See ``prumerge.ops.tome``.
    """

    needs_attention = True  # for the keys

    def __init__(self, keep: int | float = 64, r: int | None = None) -> None:
        self.keep = _checked_keep(keep)
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"r must be None or an int >= 1; got {r!r}")
        self.r = r

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, keys=True)
        assert inputs.keys is not None
        return tome(inputs.features, inputs.keys, keep=self.keep, r=self.r)

    def describe_budget(self) -> str:
        return "output tokens: size-weighted means of merged groups of patches"


@register_method("divprune")
class DivPrune(VisionMethod):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large
    Multimodal Models", CVPR 2025, arXiv 2503.02175).

    Greedy max-min diverse subset of the patches under cosine distance, starting from the most
    isolated patch. It runs on the pre-projector features here (the paper uses the LLM's input
    embeddings). See ``prumerge.ops.divprune``.
    """

    def __init__(self, keep: int | float = 64) -> None:
        self.keep = _checked_keep(keep)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        return divprune(inputs.features, keep=self.keep)

    def describe_budget(self) -> str:
        return "output tokens: a max-min diverse subset of the patches, unchanged"
