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


#: How a contextual token is made from its target and the patches assigned to it.
CONTEXTUAL_MERGES = ("target_plus_mean", "mean")


def visionzip(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    cls_attn: torch.Tensor,
    *,
    keep: int | float = 64,
    contextual: int | float = PAPER_CONTEXTUAL_FRACTION,
    cls_token: torch.Tensor | None = None,
    contextual_merge: str = "target_plus_mean",
) -> Reduction:
    """VisionZip's dominant and contextual tokens, for every row independently.

    1. **Dominant.** With ``cls_token`` given, the [CLS] token is the first output token and
       counts as one of the ``keep - n_ctx`` dominant tokens, as in the released code
       (``visionzip(model, 54, 10)`` sends [CLS] + 53 patches + 10 contextual tokens). The
       other dominant tokens are the patches with the highest [CLS] attention (ties to the
       lower index), unchanged, in raster order.
    2. **Contextual.** The remaining patches, in raster order, are split into ``n_ctx``
       targets, every ``step``-th of them with step = max(1, R // n_ctx) for R remaining,
       and the others. Each other patch joins the target whose key is most cosine-similar.
       ``contextual_merge="target_plus_mean"`` (the released code) makes each contextual
       token its target plus the mean of the patches that joined it, x_t + sum_j x_j /
       max(n, 1); ``"mean"`` makes it the plain mean of the target and those patches,
       (x_t + sum_j x_j) / (1 + n). The contextual tokens follow the dominant ones, with
       index -1.

    The released code also takes the attention and keys of the layer that outputs the
    selected features, with the keys averaged over heads, and sums the attention over heads
    (the same ranking as the mean); the caller passes them.

    Args:
        tokens: (B, N, C) patch features.
        keys: (B, N, Ck) patch keys, the similarity metric (VisionZip's are averaged over
            heads, see ``key_head_mean``; the similarity is cosine).
        cls_attn: (B, N) [CLS] attention over the patches.
        keep: output tokens per image, [CLS] (if given), dominant and contextual together:
            an int count or a float ratio of N.
        contextual: contextual tokens, an int count or a float fraction of the budget; the
            default is the paper's 10/64 (54 + 10 of 64, 108 + 20 of 128, 162 + 30 of 192).
        cls_token: (B, C) the [CLS] token's features, or None to send patches only.
        contextual_merge: ``"target_plus_mean"`` or ``"mean"``, see above.

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N patches, unchanged and without
        [CLS], if keep >= N). The [CLS] token has index -1 and no patch assigned to it.
    """
    validate_inputs(tokens, keys=keys, cls_attn=cls_attn)
    if contextual_merge not in CONTEXTUAL_MERGES:
        raise ValueError(
            f"contextual_merge must be one of {', '.join(map(repr, CONTEXTUAL_MERGES))}; "
            f"got {contextual_merge!r}"
        )
    batch, num, width = tokens.shape
    if cls_token is not None and cls_token.shape != (batch, width):
        raise ValueError(
            f"cls_token must be (B, C) = ({batch}, {width}); got {tuple(cls_token.shape)}"
        )
    device = tokens.device
    budget = budget_count(keep, num)
    n_ctx = contextual_count(contextual, budget)
    if budget >= num:
        return full_reduction(tokens)
    n_lead = budget - n_ctx  # dominant tokens, [CLS] among them
    n_cls = 1 if cls_token is not None and n_lead >= 1 else 0
    n_dom = n_lead - n_cls  # dominant patches
    feats = tokens.to(work_dtype(tokens))

    dominant = rank_descending(cls_attn.float()) < n_dom  # (B, N)
    positions = torch.arange(num, device=device).expand(batch, num)
    # Dominant patches first, then the remaining ones, each group in raster order.
    by_slot = torch.argsort(torch.where(dominant, positions, positions + num), dim=1, stable=True)
    dom_index = by_slot[:, :n_dom]  # (B, D)
    rest_index = by_slot[:, n_dom:]  # (B, R)
    dom_tokens = feats.gather(1, dom_index[..., None].expand(-1, -1, width))
    if n_cls:
        assert cls_token is not None
        dom_tokens = torch.cat([cls_token.to(feats.dtype)[:, None], dom_tokens], dim=1)
    assignment = torch.empty(batch, num, dtype=torch.long, device=device)
    dom_slot = n_cls + torch.arange(n_dom, device=device).expand(batch, n_dom)
    assignment.scatter_(1, dom_index, dom_slot)

    if n_ctx == 0:
        out = dom_tokens
        if n_dom == 0:  # [CLS] alone stands for every patch
            assignment = torch.zeros_like(assignment)
        else:
            # No contextual tokens: the rest is dropped; assign it to the nearest dominant key.
            slot_keys = keys.gather(1, dom_index[..., None].expand(-1, -1, keys.shape[-1]))
            valid = torch.ones_like(dom_index, dtype=torch.bool)
            nearest = n_cls + nearest_slot(keys, slot_keys, valid)
            assignment = torch.where(dominant, assignment, nearest)
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

        targets = feats.gather(1, target_index[..., None].expand(-1, -1, width))  # (B, n_ctx, C)
        others = feats.gather(1, other_index[..., None].expand(-1, -1, width))
        joined = torch.zeros_like(targets).scatter_add(
            1, choice[..., None].expand(-1, -1, width), others
        )  # (B, n_ctx, C): sum of the patches that joined each target
        counts = torch.zeros(batch, n_ctx, dtype=feats.dtype, device=device)
        counts = counts.scatter_add(1, choice, torch.ones_like(choice, dtype=feats.dtype))
        if contextual_merge == "target_plus_mean":
            merged = targets + joined / counts.clamp(min=1.0)[..., None]
        else:
            merged = (targets + joined) / (1.0 + counts)[..., None]
        out = torch.cat([dom_tokens, merged], dim=1)

        ctx_slot = n_lead + torch.arange(n_ctx, device=device).expand(batch, n_ctx)
        assignment.scatter_(1, target_index, ctx_slot)
        assignment.scatter_(1, other_index, n_lead + choice)

    index = torch.cat(
        [
            torch.full((batch, n_cls), -1, dtype=torch.long, device=device),
            dom_index,
            torch.full((batch, n_ctx), -1, dtype=torch.long, device=device),
        ],
        dim=1,
    )
    return Reduction(
        tokens=out.to(tokens.dtype),
        lengths=torch.full((batch,), budget, dtype=torch.long, device=device),
        index=index,
        assignment=assignment,
        attention_selected=dominant,
    )
