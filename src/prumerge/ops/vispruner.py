"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 v2): important patches by [CLS]
attention, then diverse ones by repeatedly removing the most duplicated of the rest."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, kept_reduction, validate_inputs
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count

#: The release removes at most this many duplicates per matching round.
DEDUP_ROUND = 8


def vispruner_counts(budget: int, important_ratio: float) -> tuple[int, int]:
    """(important, diverse) counts of a budget: int(T * r) and the rest, as the release."""
    important = int(budget * important_ratio)
    return important, budget - important


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, R, ...) gathered at index (B, R') along dim 1."""
    shape = index.shape + values.shape[2:]
    expanded = index.reshape(*index.shape, *([1] * (values.ndim - 2))).expand(shape)
    return values.gather(1, expanded)


def vispruner(
    tokens: torch.Tensor,
    importance: torch.Tensor,
    *,
    keep: int | float = 128,
    important_ratio: float = 0.5,
    round_size: int = DEDUP_ROUND,
) -> Reduction:
    """Keep int(T r) important patches and T - int(T r) diverse ones, unchanged, in raster order.

    1. **Important.** The patches ranked by ``importance``, highest first (ties to the lower
       index); the first int(T r) are kept.
    2. **Diverse.** The rest, in that order, are thinned until T - int(T r) are left. Each
       round splits the list alternately into A (even places) and B (odd places), scores
       every A patch by its largest cosine similarity to a B patch, and removes the
       min(``round_size``, excess) A patches with the highest scores; the new list is the
       remaining A patches by descending score, then B.

    Every row is computed on its own (each row's counts are the same, so the rounds are
    batched). Where the release crashes (an odd count of remaining patches, or a round that
    would remove more than A holds) this removes what A holds, at most.

    Args:
        tokens: (B, N, C) patch features (the similarity is computed on them).
        importance: (B, N) [CLS] attention (or another importance) over the patches.
        keep: T, output tokens per image, an int count or a float ratio of N.
        important_ratio: r in [0, 1], the share of the budget kept by importance.
        round_size: the most patches one round removes (the release's 8).

    Returns:
        A ``Reduction`` with T tokens per row (all N, unchanged, if T >= N).
    """
    validate_inputs(tokens, cls_attn=importance)
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1]; got {important_ratio}")
    if round_size < 1:
        raise ValueError(f"round_size must be >= 1; got {round_size}")
    batch, num, _ = tokens.shape
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    n_important, n_diverse = vispruner_counts(budget, important_ratio)
    order = torch.sort(importance.float(), dim=1, descending=True, stable=True).indices  # (B, N)
    important = order[:, :n_important]
    residual = order[:, n_important:]  # (B, R), by descending importance
    # float64: near-equal similarities must not swap places with rounding (the order decides
    # what each round removes); the matrices are at most N/2 x N/2.
    unit = F.normalize(tokens.double(), dim=-1)
    # One round per at most ``round_size`` removals, as in the release; batched over rows.
    while n_diverse > 0 and residual.shape[1] > n_diverse:
        a_index, b_index = residual[:, ::2], residual[:, 1::2]  # (B, ceil(R/2)), (B, R // 2)
        remove = min(round_size, residual.shape[1] - n_diverse, a_index.shape[1])
        a, b = _take(unit, a_index), _take(unit, b_index)
        scores = (a @ b.transpose(1, 2)).amax(dim=2)  # (B, |A|)
        by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
        residual = torch.cat([_take(a_index, by_score[:, remove:]), b_index], dim=1)
    chosen = important if n_diverse == 0 else torch.cat([important, residual], dim=1)
    selected = torch.zeros(batch, num, dtype=torch.bool, device=tokens.device)
    selected.scatter_(1, chosen, True)
    attention_selected = torch.zeros_like(selected)
    attention_selected.scatter_(1, important, True)
    return kept_reduction(tokens, selected, tokens, attention_selected=attention_selected)
