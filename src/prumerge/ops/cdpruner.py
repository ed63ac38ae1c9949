"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967): greedy MAP inference of a
determinantal point process whose kernel is feature similarity weighted by relevance to the
instruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, kept_reduction, validate_inputs
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count


def instruction_relevance(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N) relevance of every patch to the instruction, min-max normalised per row.

    As the release: r_i = mean over the instruction's vectors t of -cos(e_i, t) (the sign is
    the release's: patches less similar to the text weigh more), then
    (r - min + 1e-6) / (max - min), here over each row (the release: over the whole batch).

    Args:
        image_embeds: (B, N, D) one vector per patch, in the text's space.
        text_embeds: (B, M, D) the instruction's vectors for each row.
        text_mask: (B, M) bool, False at padding; None when every vector is real. A row
            without any is given relevance 1 everywhere.
    """
    image = F.normalize(image_embeds.double(), dim=-1)
    text = F.normalize(text_embeds.double(), dim=-1)
    cosine = image @ text.transpose(1, 2)  # (B, N, M)
    if text_mask is None:
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    weight = text_mask.double()[:, None, :]  # (B, 1, M)
    count = weight.sum(dim=-1)  # (B, 1)
    relevance = -(cosine * weight).sum(dim=-1) / count.clamp_min(1.0)  # (B, N)
    low = relevance.amin(dim=1, keepdim=True)
    high = relevance.amax(dim=1, keepdim=True)
    normalised = (relevance - low + 1e-6) / (high - low)
    return torch.where(count > 0, normalised, torch.ones_like(normalised))


def cdpruner(
    tokens: torch.Tensor,
    relevance: torch.Tensor | None = None,
    *,
    keep: int | float = 64,
) -> Reduction:
    """Keep the T patches the greedy conditional-DPP MAP inference picks, unchanged, in raster
    order.

    The kernel is L = diag(r) S diag(r), S the cosine similarity of ``tokens``; each step
    picks the patch with the largest residual diagonal (ties to the lower index) and updates
    the residuals as a Cholesky factorisation does (Chen et al., NeurIPS 2018, "Fast Greedy
    MAP Inference for Determinantal Point Process"). Every row is computed on its own.

    Args:
        tokens: (B, N, C) patch tokens (the projector's outputs in the release).
        relevance: (B, N) weights r from ``instruction_relevance``; None: all 1 (a plain
            diversity DPP, for calls without an instruction).
        keep: T, output tokens per image, an int count or a float ratio of N.

    Returns:
        A ``Reduction`` with T tokens per row (all N, unchanged, if T >= N).
    """
    validate_inputs(tokens, cls_attn=relevance)
    batch, num, _ = tokens.shape
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    # float64: near-equal residuals must not swap with rounding (the release: float32).
    unit = F.normalize(tokens.double(), dim=-1)
    weight = torch.ones(batch, num, dtype=torch.float64, device=tokens.device)
    if relevance is not None:
        weight = relevance.double()
    kernel = weight[:, :, None] * (unit @ unit.transpose(1, 2)) * weight[:, None, :]  # (B, N, N)
    rows = torch.arange(batch, device=tokens.device)
    factors = torch.zeros(budget, batch, num, dtype=torch.float64, device=tokens.device)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N)
    floor = 1e-9 * residual.amax(dim=1, keepdim=True)  # (B, 1)
    selected = torch.zeros(batch, num, dtype=torch.bool, device=tokens.device)
    # One step per kept patch is inherent to the greedy rule; each step is batched over rows.
    for step in range(budget):
        pick = residual.argmax(dim=1)  # (B,) argmax returns the first maximum
        selected[rows, pick] = True
        projection = torch.einsum("tb,tbn->bn", factors[:step, rows, pick], factors[:step])
        scale = residual[rows, pick].clamp_min(0).sqrt()[:, None]  # (B, 1)
        # A zero residual (a patch the kept ones already span) gives a zero factor, not NaN.
        factor = torch.where(scale > 0, (kernel[rows, pick] - projection) / scale, 0.0)
        factors[step] = factor
        residual = residual - factor.square()
        # Once the kept patches span a patch its residual is rounding noise: zero it, so that
        # the next picks (past the kernel's rank) go to the lowest index, in a batch or alone.
        residual = torch.where(residual > floor, residual, 0.0)
        residual[selected] = -float("inf")
    return kept_reduction(tokens, selected, tokens)
