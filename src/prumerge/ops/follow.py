"""Side inputs that follow a reduction: per-patch tensors cut and merged as the tokens were."""

from __future__ import annotations

import torch

from prumerge.ops.reduction import Reduction


def follow_reduction(reduction: Reduction, side: torch.Tensor) -> torch.Tensor:
    """Take a per-patch side input through a reduction, token for token.

    A model may read more per patch than the token the method reduced (Qwen3-VL adds
    DeepStack features from earlier ViT layers at each image position of its first LLM
    layers). This gives every output token the side input of what it stands for: a kept
    patch its own row, exactly; a merged token (``index`` -1) the mean of the rows of the
    patches assigned to it; a token no patch is assigned to (PruMerge's supplement) zeros.

    Args:
        reduction: the reduction of B rows of N patches into K slots.
        side: (B, N, C) per-patch side input, in the order of the reduced patches.

    Returns:
        (B, K, C): row b valid up to ``reduction.lengths[b]``, zeros after.
    """
    batch, num, channels = side.shape
    if num != reduction.num_input or batch != reduction.index.shape[0]:
        raise ValueError(
            f"side input of shape {tuple(side.shape)} does not match a reduction of "
            f"{reduction.index.shape[0]} rows of {reduction.num_input} patches"
        )
    index = reduction.index.to(side.device)  # (B, K)
    slots = index.shape[1]
    kept = side.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, channels))  # (B, K, C)
    assignment = reduction.assignment.to(side.device)  # (B, N)
    member = (assignment >= 0)[..., None].to(side.dtype)  # (B, N, 1)
    target = assignment.clamp(0, max(slots - 1, 0))[..., None]  # (B, N, 1)
    sums = torch.zeros(batch, slots, channels, dtype=side.dtype, device=side.device)
    sums = sums.scatter_add(1, target.expand(-1, -1, channels), side * member)
    counts = torch.zeros(batch, slots, 1, dtype=side.dtype, device=side.device)
    counts = counts.scatter_add(1, target, member)
    merged = sums / counts.clamp(min=1)
    out = torch.where((index >= 0)[..., None], kept, merged)
    return torch.where(reduction.valid_mask.to(side.device)[..., None], out, torch.zeros_like(out))
