"""Choosing how many tokens to keep, and which: IQR outliers, budgets, spatial samples."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from prumerge.ops.attention import check_finite


def iqr_keep_count(
    scores: torch.Tensor, *, whisker: float = 1.5, min_keep: int = 1
) -> torch.Tensor:
    """Number of scores above the upper Tukey fence Q3 + whisker * IQR, per row.

    Unlike the released PruMerge code, which takes the quartiles over the whole flattened
    batch, the fence is computed for each row on its own, so an image's budget never depends
    on the other images in its batch.

    Args:
        scores: (B, N) scores, e.g. [CLS] attention over the patches.
        whisker: fence multiplier (Tukey's 1.5 by default).
        min_keep: lower bound of every count (flat attention has no outliers at all).

    Returns:
        (B,) int64 counts in [min(min_keep, N), N].
    """
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (B, N) with N >= 1; got {tuple(scores.shape)}")
    check_finite("scores", scores)
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0; got {min_keep}")
    scores = scores.float()
    # Linear interpolation between order statistics, as numpy.percentile does by default.
    quartiles = torch.quantile(scores, torch.tensor([0.25, 0.75], device=scores.device), dim=1)
    q1, q3 = quartiles[0], quartiles[1]
    fence = q3 + whisker * (q3 - q1)  # (B,)
    count = (scores > fence[:, None]).sum(dim=1)
    return count.clamp(min=min(min_keep, scores.shape[1]))


def validate_keep(keep: int | float | None) -> None:
    """Raise ValueError unless ``keep`` is None, an int >= 1 or a float ratio in (0, 1]."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, int | float):
        raise ValueError(
            f"keep must be None, an int count or a float ratio; got {type(keep).__name__}"
        )
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep must be >= 1 when given as a count; got {keep}")
    if isinstance(keep, float) and not (0.0 < keep <= 1.0):  # also rejects NaN
        raise ValueError(f"keep as a ratio must be in (0, 1]; got {keep}")


def budget_count(keep: int | float, num_tokens: int) -> int:
    """A fixed budget as a token count: an int is a count, a float in (0, 1] a ratio of N.

    Counts above N are clamped to N; a ratio is rounded to the nearest count, at least 1.
    """
    if keep is None:
        raise ValueError("keep must be a count or a ratio here, not None")
    validate_keep(keep)
    if isinstance(keep, int):
        return min(keep, num_tokens)
    return max(1, min(num_tokens, round(keep * num_tokens)))


def infer_grid(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (rows, cols) patch grid: given, or inferred when N is a perfect square."""
    if grid is not None:
        rows, cols = grid
        if rows * cols != num_tokens:
            raise ValueError(f"grid {rows}x{cols} does not match {num_tokens} tokens")
        return rows, cols
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens are not a square grid; pass grid=(rows, cols)")
    return side, side


@lru_cache(maxsize=32)
def _spatial_rank_cpu(rows: int, cols: int) -> torch.Tensor:
    # Farthest-point ordering of the grid cells: each next cell is the one farthest (in
    # Euclidean distance) from all cells chosen so far, ties going to the lower raster index.
    # Any prefix of this order is a near-uniform spatial sample, whatever its length, which
    # is what lets PruMerge+ pick a different number of uniform samples for every image.
    # It runs once per grid shape and is cached.
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64),
        torch.arange(cols, dtype=torch.float64),
        indexing="ij",
    )
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1)  # (N, 2)
    n = points.shape[0]
    centre = torch.tensor([(rows - 1) / 2, (cols - 1) / 2], dtype=torch.float64)
    first = int(torch.argmin(((points - centre) ** 2).sum(1)))
    order = [first]
    nearest = ((points - points[first]) ** 2).sum(1)
    for _ in range(n - 1):
        nxt = int(torch.argmax(nearest))  # argmax returns the first maximum: lower index wins
        order.append(nxt)
        nearest = torch.minimum(nearest, ((points - points[nxt]) ** 2).sum(1))
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.tensor(order)] = torch.arange(n)
    return rank


def spatial_rank(rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N,) rank of every grid cell in a coarse-to-fine, spatially uniform order.

    The cells of rank < M form a near-uniform sample of M cells for every M.
    """
    return _spatial_rank_cpu(rows, cols).to(device)


def stride_samples(n_attn: torch.Tensor, num: int, factor: float = 3.0) -> torch.Tensor:
    """PruMerge+'s spatial samples in adaptive mode: the released rule, for any N and batch.

    The released code keeps every s-th patch index in raster order, ``arange(0, 575, s)``
    with s = int(int(1 / ratio) / 3) and ratio = outliers / 576, minus the patches already
    kept. Here the same rule runs per row with N for 576 (the range stops before the last
    patch, N - 1, as the release's does), so it is exact wherever the release runs. Where
    the release breaks, s < 2 (more than N/6 outliers at factor 3): s = 0 divides by zero
    (ratio > 1/3) and s = 1 samples every patch, about twice what the rule aims at; there
    the stride becomes the real number N / (factor * outliers) and the samples are
    floor(k * N / (factor * outliers)) for k = 0, 1, ... below N - 1, about ``factor`` per
    outlier as everywhere else.

    Args:
        n_attn: (B,) int64 patches each row keeps by attention (>= 1).
        num: N, patches per row.
        factor: the release's 3, samples aimed at per attention-kept patch (> 0).

    Returns:
        (B, N) bool, the sampled positions (before removing the attention-kept ones).
    """
    device = n_attn.device
    count = n_attn.clamp(min=1)
    ratio = count.to(torch.float64) / num
    # int(1 / ratio) and int(step / 3) in float64, as the released Python arithmetic does.
    step_length = torch.floor(torch.div(torch.ones_like(ratio), ratio))
    stride = torch.floor(step_length / factor)  # (B,)
    k = torch.arange(num, device=device)
    # Where the release's stride is below 2, the real stride N / (factor * outliers); exact
    # integer arithmetic for an integer factor, so that floor(k * stride) has no rounding.
    if float(factor).is_integer():
        fallback = (k[None, :] * num) // (int(factor) * count[:, None])
        dense = int(factor) * count > num  # (B,) a real stride below 1
    else:
        real = num / (factor * count.to(torch.float64))
        fallback = torch.floor(k[None, :].to(torch.float64) * real[:, None]).long()
        dense = real < 1
    # A real stride below 1 samples every index.
    fallback = torch.where(dense[:, None], k[None, :], fallback)
    released = k[None, :] * stride.long().clamp(min=1)[:, None]
    positions = torch.where((stride >= 2)[:, None], released, fallback)  # (B, N)
    inside = positions < num - 1
    sampled = torch.zeros(n_attn.shape[0], num + 1, dtype=torch.bool, device=n_attn.device)
    sampled.scatter_(1, torch.where(inside, positions, num), True)
    return sampled[:, :num]


def even_rest_samples(selected: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` patches evenly spaced, in raster order, among those ``selected`` leaves.

    With R patches left, the picks are the ones at positions floor(k * R / count), k = 0 ..
    count - 1, of the remaining patches in raster order (PruMerge+ with a fixed budget: the
    release's stride rule over the patches not yet kept, with the count made exact).

    Args:
        selected: (B, N) bool, the patches already kept; every row leaves the same R.
        count: samples to add, 0 <= count <= R.

    Returns:
        (B, N) bool, the added samples.
    """
    num = selected.shape[1]
    left = num - int(selected[0].sum()) if selected.shape[0] else num
    if count <= 0 or left <= 0:
        return torch.zeros_like(selected)
    picks = torch.zeros(left + 1, dtype=torch.bool)
    picks[(torch.arange(count) * left) // count] = True
    rest_rank = (~selected).long().cumsum(dim=1) - 1  # (B, N) rank among the remaining
    picks = picks.to(selected.device)
    return ~selected & picks[rest_rank.clamp(min=0, max=left)]


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) rank of each score in its row, highest first; ties go to the lower index.

    A stable sort makes the selection deterministic when scores tie (flat attention).
    """
    return inverse_permutation(torch.sort(scores, dim=1, descending=True, stable=True).indices)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """(B, N) inverse of a batch of permutations: the position of every element in ``perm``."""
    inverse = torch.empty_like(perm)
    positions = torch.arange(perm.shape[1], device=perm.device)
    inverse.scatter_(1, perm, positions.expand_as(perm))
    return inverse


def topk_lowest_index_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, ties going to the lower index.

    ``torch.topk`` alone breaks ties in an unspecified order; a full stable sort costs
    N log N per row. This takes topk's k-th value as a threshold and resolves ties at it by
    index, which is exact and deterministic.

    Args:
        scores: (..., N) scores.
        k: how many to take, 1 <= k <= N.

    Returns:
        (..., k) int64 indices in increasing index order (a set, not ranked by score).
    """
    values, index = scores.topk(k, dim=-1)
    threshold = values[..., -1:]  # (..., 1)
    # Fast path: when exactly k scores reach the threshold, no tie straddles the cut and
    # topk's indices are the answer (real-valued similarities almost never tie).
    reach = (scores >= threshold).sum(dim=-1)
    if bool((reach == k).all()):
        return index.sort(dim=-1).values
    above = scores > threshold
    tied = scores == threshold
    need = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=-1) <= need))
    return chosen.nonzero()[:, -1].view(*scores.shape[:-1], k)


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` tokens over parts of ``sizes`` tokens, in proportion to their sizes.

    Largest-remainder apportionment (Hamilton's method): every part gets the integer part of
    its quota total * size / sum(sizes), then the leftover tokens go to the largest
    fractional remainders (ties to the earlier part). Every part gets at least 1 and at most
    its size, so the total is clamped to [len(sizes), sum(sizes)].

    Args:
        total: tokens to hand out.
        sizes: tokens of every part, each >= 1.

    Returns:
        The count of every part; they sum to the clamped total.
    """
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be a non-empty list of counts >= 1; got {sizes}")
    whole = sum(sizes)
    total = max(len(sizes), min(total, whole))
    quotas = [total * size / whole for size in sizes]
    counts = [min(size, max(1, math.floor(q))) for q, size in zip(quotas, sizes, strict=True)]
    by_remainder = sorted(
        range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i)
    )
    while sum(counts) < total:
        for i in by_remainder:
            if counts[i] < sizes[i] and sum(counts) < total:
                counts[i] += 1
    while sum(counts) > total:  # the floor of 1 overshot: take from the largest parts
        i = max(range(len(sizes)), key=lambda j: (counts[j], -j))
        counts[i] -= 1
    return counts
