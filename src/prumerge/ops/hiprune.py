"""HiPrune (Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical
Attention in Vision-Language Models", arXiv 2508.00553): anchors and their neighbours from a middle
layer's attention, registers from a deep layer's."""

from __future__ import annotations

import torch

from prumerge.ops.keep import full_reduction, kept_reduction, validate_inputs
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, infer_grid, rank_descending

#: How an anchor's buffer neighbours are found: "release", the released code's raster
#: offsets -1, +1, -cols, +cols clamped to [0, N - 1] (left/right wrap across rows, and an
#: edge row adds patch 0 or N - 1); "grid", the anchor's 4-neighbours inside the grid.
BUFFER_MODES = ("release", "grid")


def anchor_count(budget: int, alpha: float) -> int:
    """Anchors of a budget: round(T * alpha / 5) (Python's round, as the release)."""
    return round(budget * alpha / 5)


def _buffers(anchors: torch.Tensor, rows: int, cols: int, mode: str) -> torch.Tensor:
    """(B, N) bool: the anchors and their buffer neighbours. anchors: (B, A) patch indices."""
    batch, num = anchors.shape[0], rows * cols
    mask = torch.zeros(batch, num, dtype=torch.bool, device=anchors.device)
    mask.scatter_(1, anchors, True)
    row, col = anchors // cols, anchors % cols
    for offset, inside in (
        (-1, col > 0),
        (1, col < cols - 1),
        (-cols, row > 0),
        (cols, row < rows - 1),
    ):
        near = anchors + offset
        if mode == "release":
            mask.scatter_(1, near.clamp(0, num - 1), True)
        else:
            mask.scatter_(1, torch.where(inside, near, anchors), True)
    return mask


def hiprune(
    tokens: torch.Tensor,
    object_importance: torch.Tensor,
    deep_importance: torch.Tensor,
    *,
    keep: int | float = 64,
    alpha: float = 0.1,
    grid: tuple[int, int] | None = None,
    buffers: str = "release",
) -> Reduction:
    """Keep T patches: anchors, their buffer neighbours, then registers; unchanged, raster order.

    1. **Anchors.** The round(T alpha / 5) patches with the highest ``object_importance``
       (the mean attention each patch receives in a middle layer).
    2. **Buffers.** Each anchor's neighbours above, below, left and right (``buffers``).
    3. **Registers.** The rest of the budget: the patches not chosen yet with the highest
       ``deep_importance`` (the same signal of a deep layer).

    Ties go to the lower index. Where anchors and buffers alone exceed T (a large ``alpha``
    or a small budget), the T of them with the highest object importance are kept, so the
    budget is always exact. Every row is computed on its own.

    Args:
        tokens: (B, N, C) patch features.
        object_importance: (B, N) importance from the middle ("object") layer.
        deep_importance: (B, N) importance from the deep layer.
        keep: T, output tokens per image, an int count or a float ratio of N.
        alpha: the anchors' share, T alpha / 5 anchors (each with up to 4 buffers).
        grid: (rows, cols) of the patches; inferred for a square N.
        buffers: ``BUFFER_MODES``.

    Returns:
        A ``Reduction`` with T tokens per row (all N, unchanged, if T >= N).
    """
    validate_inputs(tokens, cls_attn=deep_importance)
    validate_inputs(tokens, cls_attn=object_importance)
    if not 0.0 <= alpha <= 5.0:
        raise ValueError(f"alpha must be in [0, 5]; got {alpha}")
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers must be one of {', '.join(map(repr, BUFFER_MODES))}")
    batch, num, _ = tokens.shape
    rows, cols = infer_grid(num, grid)
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    object_rank = rank_descending(object_importance.float())  # (B, N)
    n_anchors = min(anchor_count(budget, alpha), budget)
    anchors = torch.sort(object_rank, dim=1).indices[:, :n_anchors]  # (B, A) best first
    hierarchy = _buffers(anchors, rows, cols, buffers)  # (B, N)
    # Too many anchors and buffers for the budget: the best T of them by object importance.
    surplus_rank = rank_descending(torch.where(hierarchy, -object_rank.float(), -float("inf")))
    hierarchy &= surplus_rank < budget
    # Registers: the best of the rest by deep importance, up to the budget.
    free = budget - hierarchy.sum(dim=1, keepdim=True)  # (B, 1)
    deep = torch.where(hierarchy, -float("inf"), deep_importance.float())
    selected = hierarchy | (rank_descending(deep) < free)
    return kept_reduction(tokens, selected, tokens, attention_selected=hierarchy)
