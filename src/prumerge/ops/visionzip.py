"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant plus contextual tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, nearest_slot, validate_inputs, work_dtype
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, rank_descending

#: The paper's split of a budget into contextual tokens: 10 of 64 (54 dominant + 10
#: contextual), 20 of 128 and 30 of 192 for LLaVA-1.5, all the same fraction.
PAPER_CONTEXTUAL_FRACTION = 10 / 64


def contextual_count(contextual: int | float, budget: int) -> int:
    """Contextual tokens within a budget: an int count, or a float fraction of the budget.

    The count is clamped to the budget; a fraction is rounded (10/64 of 64 is 10, of 192 is 30).
    """
    if isinstance(contextual, bool) or not isinstance(contextual, int | float):
        raise ValueError(f"contextual must be an int count or a float fraction; got {contextual!r}")
    if isinstance(contextual, int):
        if contextual < 0:
            raise ValueError(f"contextual must be >= 0 as a count; got {contextual}")
        return min(contextual, budget)
    if not 0.0 <= contextual <= 1.0:
        raise ValueError(
            f"contextual as a fraction of the budget must be in [0, 1]; got {contextual}"
        )
    return min(budget, round(contextual * budget))


def visionzip(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    cls_attn: torch.Tensor,
    *,
    keep: int | float = 64,
    contextual: int | float = PAPER_CONTEXTUAL_FRACTION,
) -> Reduction:
    """VisionZip's dominant and contextual tokens, for every row independently.

    1. **Dominant.** The ``keep - n_ctx`` patches with the highest [CLS] attention are kept
       unchanged (ties to the lower index) and emitted first, in raster order.
    2. **Contextual.** The remaining patches, in raster order, are split into ``n_ctx``
       targets, every ``step``-th of them with step = max(1, R // n_ctx) for R remaining,
       and the others. Each other patch joins the target whose key is most cosine-similar,
       and every contextual token is the plain mean of its target and the patches that
       joined it. The contextual tokens follow the dominant ones, with index -1.

    The released code counts the [CLS] token among the dominant tokens (53 patches + [CLS]
    of 54 for LLaVA-1.5); here ``tokens`` holds patches only, so all dominant tokens are
    patches. The released code also takes the attention and keys of the layer that outputs
    the selected features, and sums the attention over heads (the same ranking as the mean).

    Args:
        tokens: (B, N, C) patch features.
        keys: (B, N, Ck) patch keys (VisionZip averages them over heads; any per-patch key
            works, the similarity is cosine).
        cls_attn: (B, N) [CLS] attention over the patches.
        keep: output tokens per image, dominant plus contextual: an int count or a float
            ratio of N.
        contextual: contextual tokens, an int count or a float fraction of the budget; the
            default is the paper's 10/64 (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192).

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N, unchanged, if keep >= N).
    """
    validate_inputs(tokens, keys=keys, cls_attn=cls_attn)
    batch, num, width = tokens.shape
    device = tokens.device
    budget = budget_count(keep, num)
    n_ctx = contextual_count(contextual, budget)
    if budget >= num:
        return full_reduction(tokens)
    n_dom = budget - n_ctx
    feats = tokens.to(work_dtype(tokens))

    dominant = rank_descending(cls_attn.float()) < n_dom  # (B, N)
    positions = torch.arange(num, device=device).expand(batch, num)
    # Dominant patches first, then the remaining ones, each group in raster order.
    by_slot = torch.argsort(torch.where(dominant, positions, positions + num), dim=1, stable=True)
    dom_index = by_slot[:, :n_dom]  # (B, D)
    rest_index = by_slot[:, n_dom:]  # (B, R)
    dom_tokens = feats.gather(1, dom_index[..., None].expand(-1, -1, width))
    assignment = torch.empty(batch, num, dtype=torch.long, device=device)
    assignment.scatter_(1, dom_index, torch.arange(n_dom, device=device).expand(batch, n_dom))

    if n_ctx == 0:
        # No contextual tokens: the rest is dropped; assign it to the nearest dominant key.
        slot_keys = keys.gather(1, dom_index[..., None].expand(-1, -1, keys.shape[-1]))
        nearest = nearest_slot(keys, slot_keys, torch.ones_like(dom_index, dtype=torch.bool))
        assignment = torch.where(dominant, assignment, nearest)
        out = dom_tokens
    else:
        remaining = num - n_dom
        step = max(1, remaining // n_ctx)
        # Positions within the remaining patches, built on the CPU (their sizes are known).
        is_target = torch.zeros(remaining, dtype=torch.bool)
        is_target[torch.arange(0, remaining, step)[:n_ctx]] = True
        target_pos = is_target.nonzero().flatten().to(device)  # (n_ctx,)
        other_pos = (~is_target).nonzero().flatten().to(device)  # (O,)
        target_index = rest_index[:, target_pos]  # (B, n_ctx)
        other_index = rest_index[:, other_pos]  # (B, O)

        unit = F.normalize(keys.to(work_dtype(keys)), dim=-1)
        key_width = unit.shape[-1]
        target_keys = unit.gather(1, target_index[..., None].expand(-1, -1, key_width))
        other_keys = unit.gather(1, other_index[..., None].expand(-1, -1, key_width))
        choice = (other_keys @ target_keys.transpose(1, 2)).argmax(dim=-1)  # (B, O)

        sums = feats.gather(1, target_index[..., None].expand(-1, -1, width))  # (B, n_ctx, C)
        others = feats.gather(1, other_index[..., None].expand(-1, -1, width))
        sums = sums.scatter_add(1, choice[..., None].expand(-1, -1, width), others)
        counts = torch.ones(batch, n_ctx, dtype=feats.dtype, device=device)
        counts = counts.scatter_add(1, choice, torch.ones_like(choice, dtype=feats.dtype))
        out = torch.cat([dom_tokens, sums / counts[..., None]], dim=1)

        ctx_slot = n_dom + torch.arange(n_ctx, device=device).expand(batch, n_ctx)
        assignment.scatter_(1, target_index, ctx_slot)
        assignment.scatter_(1, other_index, n_dom + choice)

    index = torch.cat(
        [dom_index, torch.full((batch, budget - n_dom), -1, dtype=torch.long, device=device)],
        dim=1,
    )
    return Reduction(
        tokens=out.to(tokens.dtype),
        lengths=torch.full((batch,), budget, dtype=torch.long, device=device),
        index=index,
        assignment=assignment,
        attention_selected=dominant,
    )
