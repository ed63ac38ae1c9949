"""Building a ``Reduction`` from a set of kept patches, and the input checks the methods share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prumerge.ops.attention import check_finite
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import inverse_permutation


def validate_inputs(
    tokens: torch.Tensor,
    *,
    keys: torch.Tensor | None = None,
    cls_attn: torch.Tensor | None = None,
) -> None:
    """Raise ValueError, naming the problem, unless the inputs of a reduction op fit together.

    Args:
        tokens: (B, N, C) floating-point patch features, N >= 1.
        keys: (B, N, Ck) keys or another per-patch metric, if the op takes one.
        cls_attn: (B, N) [CLS] attention over the patches, if the op takes it.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, C); got {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise ValueError(f"tokens must be floating point; got {tokens.dtype}")
    batch, num, _ = tokens.shape
    if num == 0:
        raise ValueError("there are no tokens to reduce (N = 0)")
    if keys is not None and (keys.ndim != 3 or keys.shape[:2] != (batch, num)):
        raise ValueError(f"keys must be (B, N, Ck) = ({batch}, {num}, Ck); got {tuple(keys.shape)}")
    if cls_attn is not None and cls_attn.shape != (batch, num):
        raise ValueError(f"cls_attn must be (B, N) = ({batch}, {num}); got {tuple(cls_attn.shape)}")
    for name, tensor in (("tokens", tokens), ("keys", keys), ("cls_attn", cls_attn)):
        if tensor is None:
            continue
        if tensor.device != tokens.device:
            raise ValueError(f"{name} is on {tensor.device} but tokens are on {tokens.device}")
        check_finite(name, tensor)


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype to compute in: float32, or float64 for float64 inputs."""
    return torch.promote_types(tensor.dtype, torch.float32)


def full_reduction(tokens: torch.Tensor) -> Reduction:
    """All N tokens, unchanged and in order (what every method returns for a budget >= N).

    Args:
        tokens: (B, N, C) patch features; returned as they are.
    """
    batch, num, _ = tokens.shape
    index = torch.arange(num, device=tokens.device).expand(batch, num).clone()
    return Reduction(
        tokens=tokens,
        lengths=torch.full((batch,), num, dtype=torch.long, device=tokens.device),
        index=index,
        assignment=index.clone(),
        attention_selected=torch.zeros(batch, num, dtype=torch.bool, device=tokens.device),
    )


def nearest_slot(
    metric: torch.Tensor, slot_metric: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """For every patch, the valid output slot whose metric is most cosine-similar to its own.

    Args:
        metric: (B, N, D) per-patch metric (keys or features).
        slot_metric: (B, K, D) metric of the output slots.
        valid: (B, K) bool, slots that may be chosen (at least one per row).

    Returns:
        (B, N) int64 slot per patch; ties go to the lower slot.
    """
    unit = F.normalize(metric.to(work_dtype(metric)), dim=-1)
    unit_slots = F.normalize(slot_metric.to(unit.dtype), dim=-1)
    similarity = unit_slots @ unit.transpose(1, 2)  # (B, K, N)
    similarity = similarity.masked_fill(~valid[..., None], float("-inf"))
    return similarity.argmax(dim=1)  # argmax returns the first maximum


def kept_reduction(
    tokens: torch.Tensor,
    selected: torch.Tensor,
    metric: torch.Tensor,
    *,
    attention_selected: torch.Tensor | None = None,
) -> Reduction:
    """The ``Reduction`` of a drop-only method: the selected patches, unchanged, in raster order.

    Every dropped patch is assigned to the kept patch whose ``metric`` is most cosine-similar
    (for pictures of what stands for what); nothing is merged.

    Args:
        tokens: (B, N, C) patch features.
        selected: (B, N) bool, the patches to keep; rows may keep different numbers (>= 1).
        metric: (B, N, D) per-patch metric for the assignment of dropped patches.
        attention_selected: (B, N) bool, the patches chosen by [CLS] attention; all False
            when omitted.

    Returns:
        A ``Reduction`` padded to the largest row; tokens keep their dtype and device.
    """
    batch, num, width = tokens.shape
    device = tokens.device
    n_keep = selected.sum(dim=1)  # (B,)
    if bool((n_keep == 0).any()):
        raise ValueError("every row must keep at least one patch")
    positions = torch.arange(num, device=device).expand(batch, num)
    # Kept patches first, in raster order, then the dropped ones.
    by_slot = torch.argsort(torch.where(selected, positions, positions + num), dim=1, stable=True)
    max_keep = int(n_keep.max())
    kept_index = by_slot[:, :max_keep]  # (B, K)
    valid = torch.arange(max_keep, device=device)[None, :] < n_keep[:, None]  # (B, K)
    kept = tokens.gather(1, kept_index[..., None].expand(-1, -1, width))  # (B, K, C)
    kept = kept.masked_fill(~valid[..., None], 0)
    slot_metric = metric.gather(1, kept_index[..., None].expand(-1, -1, metric.shape[-1]))
    assignment = nearest_slot(metric, slot_metric, valid)
    assignment = torch.where(selected, inverse_permutation(by_slot), assignment)
    if attention_selected is None:
        attention_selected = torch.zeros_like(selected)
    return Reduction(
        tokens=kept,
        lengths=n_keep,
        index=torch.where(valid, kept_index, torch.full_like(kept_index, -1)),
        assignment=assignment,
        attention_selected=attention_selected,
    )
