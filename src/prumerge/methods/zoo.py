"""The peers users compare PruMerge against: random, pool, downsample, cls_topk, visionzip,
tome, divprune.

Every method here takes ``keep``, the number of output tokens the LLM sees per image (an int
count, or a float ratio of the N patches), and returns all N tokens unchanged when keep >= N.
"""

from __future__ import annotations

import torch

from prumerge.methods.base import (
    FEATURE_SPACES,
    IMPORTANCE_CHOICES,
    WHERE_CHOICES,
    TowerMerge,
    VisionInputs,
    VisionMethod,
    check_bool,
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
    key_head_mean,
    pooled_grid,
    random_sample,
    spatial_pool,
    tome,
    visionzip,
)
from prumerge.ops.tome import TOME_ORDERS, tome_schedule
from prumerge.ops.visionzip import CONTEXTUAL_MERGES, PAPER_CONTEXTUAL_FRACTION, contextual_count


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

    As in the released FasterVLM code, the attention is that of the layer that outputs the
    selected features (``attentions[-2]`` for LLaVA-1.5), averaged over heads, and the kept
    patches go to the LLM unchanged in raster order; ``attention_source="consumer"`` reads
    the layer that consumes them instead. See ``prumerge.ops.cls_topk``; the keys
    only decide which kept patch each dropped patch is drawn as belonging to.
    """

    needs_attention = True

    def __init__(
        self, keep: int | float = 64, importance: str = "auto", attention_source: str = "producer"
    ) -> None:
        self.keep = check_keep(keep)
        self.importance = check_choice("importance", importance, IMPORTANCE_CHOICES)
        # "consumer" (the layer that reads the features, PruMerge's) was the former default.
        self.attention_source = check_choice(  # type: ignore[misc]
            "attention_source", attention_source, ("producer", "consumer")
        )

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, attn=True)
        assert inputs.cls_attn is not None
        return cls_topk(
            inputs.features, inputs.cls_attn, keys=inputs.keys, keep=self.budget_for(inputs)
        )

    def describe_budget(self) -> str:
        return "output tokens: the patches with the highest importance, unchanged"


#: The similarity metric of the key-matching methods: "key_mean", the keys averaged over
#: heads (the released ToMe and VisionZip code); "keys", the full-width keys.
KEY_METRICS = ("key_mean", "keys")


def key_metric(inputs: VisionInputs, metric: str) -> torch.Tensor:
    """(B, N, Ck) the keys as ``metric`` says: averaged over heads, or as they are."""
    assert inputs.keys is not None
    return key_head_mean(inputs.keys, inputs.key_heads) if metric == "key_mean" else inputs.keys


@register_method("visionzip")
class VisionZip(VisionMethod):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision
    Language Models", CVPR 2025, arXiv 2412.04467), as its released code computes it.

    Dominant tokens: the [CLS] token (on towers that have one) and the patches with the
    highest [CLS] attention of the layer that outputs the selected features; contextual
    tokens: the remaining patches assigned to evenly spaced targets by the cosine
    similarity of that layer's keys averaged over heads, each made its target plus the mean
    of the patches assigned to it. ``keep`` counts every token sent, [CLS] included:
    ``keep=64`` is the release's ``visionzip(model, 54, 10)``, [CLS] + 53 patches + 10
    contextual tokens. ``contextual`` is a count or a fraction of the budget (default 10/64:
    20 of 128, 30 of 192). Options that depart from the release: ``contextual_merge="mean"``
    (the plain mean of target and members), ``metric="keys"`` (full-width keys),
    ``cls_token=False`` (patches only). See ``prumerge.ops.visionzip`` and docs/methods.md.
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
        contextual_merge: str = "target_plus_mean",
        metric: str = "key_mean",
        cls_token: bool = True,
    ) -> None:
        self.keep = check_keep(keep)
        contextual_count(contextual, 1)  # validates
        self.contextual = contextual
        self.importance = check_choice("importance", importance, IMPORTANCE_CHOICES)
        self.contextual_merge = check_choice(
            "contextual_merge", contextual_merge, CONTEXTUAL_MERGES
        )
        self.metric = check_choice("metric", metric, KEY_METRICS)
        self.cls_token = check_bool("cls_token", cls_token)

    def reduce(self, inputs: VisionInputs) -> Reduction:
        _require(inputs, self.name, keys=True, attn=True)
        assert inputs.cls_attn is not None
        return visionzip(
            inputs.features,
            key_metric(inputs, self.metric),
            inputs.cls_attn,
            keep=self.budget_for(inputs),
            contextual=self.contextual,
            cls_token=inputs.cls_token if self.cls_token else None,
            contextual_merge=self.contextual_merge,
        )

    def describe_budget(self) -> str:
        return (
            "output tokens: [CLS] (where the tower has one) and dominant patches by importance, "
            "plus contextual (merged) tokens"
        )


@register_method("tome")
class ToMe(VisionMethod):
    """ToMe, token merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023,
    arXiv 2210.09461), inside the vision tower as its released code does.

    Every encoder layer that produces the selected features merges r tokens between its
    attention and its MLP by bipartite soft matching on that layer's keys averaged over
    heads, with size-weighted merges and proportional attention (log size added to the
    attention logits), the [CLS] token protected. ``keep`` (the patches the LLM sees) fixes
    the per-layer schedule: the N - keep merges spread evenly over the layers, one more in
    the first (N - keep) mod L (see ``prumerge.ops.tome.tome_schedule``); LLaVA-1.5's 576
    patches at keep=64 merge 23 tokens in each of the first 6 of its 23 layers and 22 in the
    rest. The merged tokens go on in raster order of the patch each stands for.

    ``where="auto"`` merges inside the tower where the family's tower can be patched
    (LLaVA-1.5's CLIP, DINOv2 and SigLIP towers, eager or sdpa attention) and after it
    elsewhere (anyres views, Qwen's merger, towers with register tokens); ``"tower"``
    refuses those families; ``"after"`` merges the selected layer's tokens after the tower in
    rounds of at most ``r`` (None: half the tokens per round). Other options that depart from
    the release: ``metric="keys"``, ``order="tome"``, ``proportional_attention=False``. See
    docs/methods.md.
    """

    needs_attention = True  # the keys, when merging after the tower

    def __init__(
        self,
        keep: int | float = 64,
        r: int | None = None,
        where: str = "auto",
        metric: str = "key_mean",
        order: str = "raster",
        proportional_attention: bool = True,
    ) -> None:
        self.keep = check_keep(keep)
        self.r = None if r is None else check_int("r", r, minimum=1)
        self.where = check_choice("where", where, WHERE_CHOICES)
        if self.r is not None and where == "tower":
            raise ValueError(
                "r is the round size of merging after the tower; inside the tower each "
                "layer's r follows from keep"
            )
        self.metric = check_choice("metric", metric, KEY_METRICS)
        self.order = check_choice("order", order, TOME_ORDERS)
        self.proportional_attention = check_bool("proportional_attention", proportional_attention)

    def tower_merge(
        self, *, num_patches: int, num_prefix_tokens: int, num_layers: int
    ) -> TowerMerge | None:
        if self.where == "after":
            return None
        budget = budget_count(self.keep, num_patches)
        schedule = tome_schedule(num_patches, budget, num_layers, protected=num_prefix_tokens)
        return TowerMerge(
            schedule=schedule,
            protected=num_prefix_tokens,
            metric=self.metric,
            order=self.order,
            proportional_attention=self.proportional_attention,
        )

    def reduce(self, inputs: VisionInputs) -> Reduction:
        # Merging after the tower: the adapter's fallback where the tower cannot merge.
        _require(inputs, self.name, keys=True)
        return tome(
            inputs.features, key_metric(inputs, self.metric), keep=self.budget_for(inputs), r=self.r
        )

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
