"""Top-k patches by [CLS] attention, without merging (FasterVLM-style)."""

from __future__ import annotations

import torch

from prumerge.ops.keep import full_reduction, kept_reduction, validate_inputs
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, rank_descending


def cls_topk(
    tokens: torch.Tensor,
    cls_attn: torch.Tensor,
    *,
    keys: torch.Tensor | None = None,
    keep: int | float = 64,
) -> Reduction:
    """Keep the ``keep`` patches with the highest [CLS] attention, unchanged, in raster order.

    The rest are dropped, not merged (as FasterVLM, Zhang et al., arXiv 2412.01818, does).
    Ties in attention go to the lower patch index. Each dropped patch is assigned to the
    kept patch with the most cosine-similar key (its feature when ``keys`` is None).

    Args:
        tokens: (B, N, C) patch features.
        cls_attn: (B, N) [CLS] attention over the patches.
        keys: (B, N, Ck) patch keys, only for ``assignment``; optional.
        keep: output tokens per image, an int count or a float ratio of N.

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N, unchanged, if keep >= N).
    """
    validate_inputs(tokens, keys=keys, cls_attn=cls_attn)
    num = tokens.shape[1]
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    selected = rank_descending(cls_attn.float()) < budget  # (B, N)
    metric = tokens if keys is None else keys
    return kept_reduction(tokens, selected, metric, attention_selected=selected)
