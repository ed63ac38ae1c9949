"""PruMerge and PruMerge+ (Shang et al., arXiv 2403.15388) as batched tensor operations."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from prumerge.ops.attention import check_finite
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import (
    budget_count,
    even_rest_samples,
    infer_grid,
    inverse_permutation,
    iqr_keep_count,
    rank_descending,
    spatial_rank,
    stride_samples,
    topk_lowest_index_ties,
)

MergeMode = Literal["sum", "mean", "none"]
OrderMode = Literal["raster", "attention"]
SpatialMode = Literal["stride", "grid"]
#: PruMerge+'s spatial samplers: "stride", the released raster-stride rule (generalised, see
#: ``prumerge.ops.select.stride_samples``); "grid", a farthest-point order of the grid cells.
SPATIAL_MODES = ("stride", "grid")


def _validate(tokens: torch.Tensor, keys: torch.Tensor, cls_attn: torch.Tensor) -> None:
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, C); got {tuple(tokens.shape)}")
    batch, num, _ = tokens.shape
    if keys.ndim != 3 or keys.shape[:2] != (batch, num):
        raise ValueError(f"keys must be (B, N, Ck) = ({batch}, {num}, Ck); got {tuple(keys.shape)}")
    if cls_attn.shape != (batch, num):
        raise ValueError(f"cls_attn must be (B, N) = ({batch}, {num}); got {tuple(cls_attn.shape)}")
    if num == 0:
        raise ValueError("there are no tokens to reduce (N = 0)")
    for name, tensor in (("tokens", tokens), ("keys", keys), ("cls_attn", cls_attn)):
        check_finite(name, tensor)


def prumerge(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    cls_attn: torch.Tensor,
    *,
    keep: int | float | None = None,
    knn: int = 32,
    plus: bool = False,
    grid: tuple[int, int] | None = None,
    supplement: bool = True,
    merge: MergeMode = "sum",
    whisker: float = 1.5,
    min_keep: int = 1,
    uniform_factor: float = 3.0,
    order: OrderMode = "raster",
    spatial: SpatialMode = "stride",
) -> Reduction:
    """Prune visual tokens to the [CLS]-attention outliers and merge the rest into them.

    Steps, for every row independently:

    1. **Select.** ``keep=None`` keeps the patches whose [CLS] attention lies above the
       row's upper fence Q3 + whisker * IQR (at least ``min_keep``). An int keeps that many
       output tokens, a float in (0, 1] that fraction of N; the supplement token counts
       toward a fixed budget. Ties in attention go to the lower patch index.
    2. **PruMerge+** (``plus=True``) adds spatial samples, skipping patches already
       selected. ``spatial="stride"`` (the released code): in adaptive mode every s-th
       patch in raster order, s = int(int(N / outliers) / uniform_factor), which aims at
       ``uniform_factor`` (3) samples per outlier (``stride_samples``: exact where the
       release runs, a real-valued stride where its s would be 0 or 1); with a fixed
       budget, which the release has no rule for at inference, the budget is split 1 :
       uniform_factor between attention picks and samples, and the samples are evenly
       spaced in raster order among the patches left (``even_rest_samples``).
       ``spatial="grid"``: a farthest-point order of the grid cells (``spatial_rank``),
       ``uniform_factor`` samples per outlier in adaptive mode, or the same split.
    3. **Merge.** Each kept token i takes its ``knn`` nearest patches by cosine similarity of
       the keys (among all other patches) and adds their features weighted by their [CLS]
       attention a_j. ``merge="sum"`` is the released code, x_i + sum_j a_j x_j, and the
       default because the paper's reported numbers come from it. ``merge="mean"`` is the
       weighted average the paper's text describes, (a_i x_i + sum_j a_j x_j) / (a_i +
       sum_j a_j), which keeps the feature scale. ``merge="none"`` skips merging.
    4. **Supplement.** With ``supplement=True`` one more token, sum_j a_j x_j over the pruned
       patches, follows the kept ones (as in the released code). Rows that keep all N
       patches are returned unmerged and without it.

    Args:
        tokens: (B, N, C) patch features to reduce (the prefix tokens already removed).
        keys: (B, N, Ck) key projections of the patches in the layer the attention came from.
        cls_attn: (B, N) [CLS] attention over the patches, e.g. from ``cls_attention``.
        keep: None for adaptive (IQR), an int count or a float ratio of N.
        knn: neighbours merged into each kept token; clamped to N - 1.
        plus: PruMerge+ spatial samples.
        grid: (rows, cols) patch grid for ``plus``; inferred when N is a perfect square.
        supplement: append the attention-weighted sum of the pruned patches.
        merge: ``"sum"``, ``"mean"`` or ``"none"``, see above.
        whisker: IQR fence multiplier of the adaptive rule.
        min_keep: least number of attention-selected patches in adaptive mode (>= 1).
        uniform_factor: PruMerge+ spatial samples per attention-selected patch.
        order: ``"raster"`` (default) emits kept tokens in spatial order, which keeps the
            LLM's positions meaningful; ``"attention"`` as the released code does: the
            attention picks in descending attention, then PruMerge+'s samples in raster
            order.
        spatial: ``"stride"`` or ``"grid"``, PruMerge+'s sampler (see above).

    Returns:
        A ``Reduction``; ``tokens`` has the dtype and device of the input.
    """
    _validate(tokens, keys, cls_attn)
    if knn < 0:
        raise ValueError(f"knn must be >= 0; got {knn}")
    if merge not in ("sum", "mean", "none"):
        raise ValueError(f"unknown merge mode {merge!r}; expected 'sum', 'mean' or 'none'")
    if order not in ("raster", "attention"):
        raise ValueError(f"unknown order {order!r}; expected 'raster' or 'attention'")
    if spatial not in SPATIAL_MODES:
        raise ValueError(f"unknown spatial sampler {spatial!r}; expected 'stride' or 'grid'")
    if uniform_factor < 0:
        raise ValueError(f"uniform_factor must be >= 0; got {uniform_factor}")
    if min_keep < 1:
        # A row whose attention has no outlier would keep nothing at all.
        raise ValueError(f"min_keep must be >= 1; got {min_keep}")
    batch, num, width = tokens.shape
    device = tokens.device
    attn = cls_attn.float()
    feats = tokens.float()

    # 1-2. How many patches each row selects by attention and by spatial sampling.
    if keep is None:
        n_attn = iqr_keep_count(attn, whisker=whisker, min_keep=min_keep)
        n_uniform = (
            torch.minimum(num - n_attn, (n_attn.float() * uniform_factor).round().long())
            if plus and spatial == "grid"
            else torch.zeros_like(n_attn)
        )
        with_supplement = torch.full((batch,), supplement, dtype=torch.bool, device=device)
    else:
        budget = budget_count(keep, num)
        use_supplement = supplement and 2 <= budget < num
        n_select = budget - 1 if use_supplement else budget
        n_attn_int = max(1, math.ceil(n_select / (1.0 + uniform_factor))) if plus else n_select
        n_attn = torch.full((batch,), n_attn_int, dtype=torch.long, device=device)
        n_uniform = torch.full((batch,), n_select - n_attn_int, dtype=torch.long, device=device)
        with_supplement = torch.full((batch,), use_supplement, dtype=torch.bool, device=device)

    attn_rank = rank_descending(attn)  # (B, N)
    attention_selected = attn_rank < n_attn[:, None]
    selected = attention_selected
    if plus and spatial == "grid":
        rows, cols = infer_grid(num, grid)
        # Cells already chosen by attention move behind all others, so the first n_uniform
        # cells of this order are the spatial samples, de-duplicated against them.
        uniform_key = spatial_rank(rows, cols, device)[None, :] + num * attention_selected
        uniform_rank = inverse_permutation(torch.argsort(uniform_key, dim=1, stable=True))
        selected = selected | (uniform_rank < n_uniform[:, None])
    elif plus and keep is None:
        if uniform_factor > 0:
            selected = selected | stride_samples(n_attn, num, uniform_factor)
    elif plus:
        selected = selected | even_rest_samples(attention_selected, int(n_uniform[0]))
    n_keep = selected.sum(dim=1)  # (B,)
    with_supplement = with_supplement & (n_keep < num)

    # Output order: selected patches first (raster or attention order), then the rest.
    positions = torch.arange(num, device=device).expand(batch, num)
    # "attention": the release's order, attention picks by rank, then the samples by index.
    within = (
        positions
        if order == "raster"
        else torch.where(attention_selected, attn_rank, positions + num)
    )
    sort_key = torch.where(selected, within, within + num)
    by_slot = torch.argsort(sort_key, dim=1, stable=True)  # (B, N) patch index per slot
    max_keep = int(n_keep.max())
    kept_index = by_slot[:, :max_keep]  # (B, K)
    valid = torch.arange(max_keep, device=device)[None, :] < n_keep[:, None]  # (B, K)
    # Padding slots (rows keeping fewer than K) stand in for slot 0's patch, so that their
    # similarity rows copy slot 0's: they never win the assignment argmax below and add no
    # artificial ties to the top-k. They are zeroed at the end.
    kept_index = torch.where(valid, kept_index, kept_index[:, :1])
    kept = feats.gather(1, kept_index[..., None].expand(-1, -1, width))  # (B, K, C)

    # 3. Token supplement: key similarity of every kept token to every patch.
    keys_f = keys.float()
    norms = keys_f.norm(dim=-1).clamp_min(1e-12)  # (B, N)
    # Cosine similarity, normalising the (B, K, N) products rather than the (B, N, Ck) keys.
    similarity = keys_f.gather(1, kept_index[..., None].expand(-1, -1, keys_f.shape[-1])) @ (
        keys_f.transpose(1, 2)
    )  # (B, K, N)
    similarity = similarity / (norms.gather(1, kept_index)[..., None] * norms[:, None, :])
    # Which output slot stands for each patch: itself if kept, else the most key-similar
    # kept token of its row (for pictures of the merge).
    assignment = similarity.argmax(dim=1)  # (B, N), first maximum: the lower slot
    own_slot = inverse_permutation(by_slot)
    assignment = torch.where(selected, own_slot, assignment)
    index = torch.where(valid, kept_index, torch.full_like(kept_index, -1))

    neighbours = min(knn, num - 1)
    if merge != "none" and neighbours > 0:
        others = similarity.scatter_(2, kept_index[..., None], float("-inf"))  # exclude self
        nearest = topk_lowest_index_ties(others, neighbours)  # (B, K, k)
        weight = attn[:, None, :].expand(-1, max_keep, -1).gather(2, nearest)  # (B, K, k)
        # sum_j a_j x_j over each token's k neighbours, without a dense (B, K, N) product:
        # one weighted bag per kept token over the batch's flattened patch table.
        offsets = (torch.arange(batch, device=device) * num)[:, None, None]
        merged = F.embedding_bag(
            (nearest + offsets).view(-1, neighbours),
            feats.reshape(batch * num, width),
            per_sample_weights=weight.reshape(-1, neighbours),
            mode="sum",
        ).view(batch, max_keep, width)
        if merge == "sum":
            merged = kept + merged
        else:
            self_weight = attn.gather(1, kept_index)[..., None]  # (B, K, 1)
            total = self_weight + weight.sum(dim=2, keepdim=True)
            merged = (self_weight * kept + merged) / total
        reduced = (n_keep < num)[:, None, None]  # rows that keep everything stay unmerged
        kept = torch.where(reduced, merged, kept)
    kept = kept * valid[..., None]

    # 4. Supplement token, placed right after each row's kept tokens.
    lengths = n_keep + with_supplement.long()
    if bool(with_supplement.any()):
        pruned_weight = attn * (~selected)  # (B, N)
        extra = (pruned_weight[:, None, :] @ feats).squeeze(1)  # (B, C)
        kept = torch.cat([kept, torch.zeros_like(kept[:, :1])], dim=1)
        index = torch.cat([index, torch.full_like(index[:, :1], -1)], dim=1)
        slot = n_keep.clamp(max=kept.shape[1] - 1)
        place = F.one_hot(slot, kept.shape[1]).bool() & with_supplement[:, None]  # (B, K+1)
        kept = torch.where(place[..., None], extra[:, None, :], kept)

    return Reduction(
        tokens=kept.to(tokens.dtype),
        lengths=lengths,
        index=index,
        assignment=assignment,
        attention_selected=attention_selected,
    )
