"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): greedy max-min diverse patches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, kept_reduction, validate_inputs, work_dtype
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count


def divprune(
    tokens: torch.Tensor,
    *,
    keep: int | float = 64,
    metric: torch.Tensor | None = None,
) -> Reduction:
    """Keep a max-min diverse subset of the patches, chosen greedily, in raster order.

    DivPrune casts pruning as the Max-Min Diversity Problem with the cosine distance
    d(i, j) = 1 - cos(x_i, x_j), and solves it greedily, for every row independently:

    1. **Start.** The first patch is the most isolated one: the patch whose nearest other
       patch is farthest (the released code takes the second-smallest distance of each
       column, which is the same up to rounding, since a patch's distance to itself is 0).
    2. **Grow.** Each next patch is the unselected one whose distance to its nearest
       selected patch is largest, until ``keep`` are selected. Ties go to the lower index.

    The kept patches are unchanged and nothing is merged; each dropped patch is assigned to
    the kept patch closest in the same metric. The paper applies this to the LLM's input
    embeddings (after the projector); here it sees whatever ``metric`` is given, the
    pre-projector features by default.

    Args:
        tokens: (B, N, C) patch features.
        keep: output tokens per image, an int count or a float ratio of N.
        metric: (B, N, D) per-patch vectors for the distance; ``tokens`` when None.

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N, unchanged, if keep >= N).
    """
    validate_inputs(tokens, keys=metric)
    batch, num, _ = tokens.shape
    device = tokens.device
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    vectors = tokens if metric is None else metric
    unit = F.normalize(vectors.to(work_dtype(vectors)), dim=-1)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # (B, N, N)
    eye = torch.eye(num, dtype=torch.bool, device=device)
    isolation = distance.masked_fill(eye, float("inf")).amin(dim=2)  # (B, N)
    pick = isolation.argmax(dim=1)  # (B,); argmax returns the first maximum

    selected = torch.zeros(batch, num, dtype=torch.bool, device=device)
    to_selected = torch.full((batch, num), float("inf"), dtype=distance.dtype, device=device)
    # One step per kept patch is inherent to the greedy rule; each step is batched over rows.
    for step in range(budget):
        if step:
            # Masking the selected patches guards against re-picking one when rounding
            # leaves its distance to itself above some other patch's.
            pick = to_selected.masked_fill(selected, float("-inf")).argmax(dim=1)
        selected.scatter_(1, pick[:, None], True)
        row = distance.gather(1, pick[:, None, None].expand(-1, 1, num)).squeeze(1)  # (B, N)
        to_selected = torch.minimum(to_selected, row)
    return kept_reduction(tokens, selected, unit)
