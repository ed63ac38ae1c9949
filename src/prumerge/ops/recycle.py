"""SparseVLM's recycling of pruned tokens (Zhang et al., ICML 2025, section 3.4): the most
relevant of the pruned tokens are clustered by density peaks (DPC-kNN) and each cluster's
mean goes on as one token."""

from __future__ import annotations

import torch


def recycle_counts(dropped: int) -> tuple[int, int]:
    """``(recycled, clusters)`` for ``dropped`` pruned tokens, as the release counts them:
    the top int(0.3 · d) + 1 pruned tokens by score are clustered into int(r / 10) + 1
    clusters; nothing for d = 0."""
    if dropped <= 0:
        return 0, 0
    recycled = int(dropped * 0.3) + 1
    return recycled, int(recycled / 10) + 1


def density_peak_clusters(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cluster of every token and the centre of every cluster, by density peaks over
    k-nearest neighbours (DPC-kNN).

    As the release's ``cluster_and_merge``: distances ||x_i - x_j|| / sqrt(C); density
    exp(-mean of the squared distances to the k = ``clusters`` nearest tokens, the token
    itself included); each token's distance to the nearest denser token (the largest distance
    of all for the densest); the ``clusters`` tokens with the largest distance x density are
    the centres, in that order; every other token joins its nearest centre. The release adds
    random noise of up to 1e-6 to the densities so that no two are equal (two mutual nearest
    neighbours have equal densities, and neither would have a denser one); here, of equal
    densities, the lower index counts as the denser, and equal scores go to the lower index.

    Args:
        tokens: (M, C) the tokens to cluster, M >= ``clusters`` >= 1.
        clusters: the number of clusters.

    Returns:
        (M,) int64: each token's cluster, numbered in the order of the centres; and (K,)
        int64: the centres, as indices into ``tokens``.
    """
    count, width = tokens.shape
    if not 1 <= clusters <= count:
        raise ValueError(f"clusters must be in 1..{count}; got {clusters}")
    x = tokens.double()
    # Exact differences (no matrix-product shortcut), so that a token is at 0 from itself.
    distance = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0]
    distance = distance / width**0.5  # (M, M)
    nearest = distance.topk(clusters, dim=-1, largest=False).values  # (M, k)
    density = (-(nearest**2).mean(dim=-1)).exp()  # (M,)
    index = torch.arange(count, device=tokens.device)
    equal = (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    denser = (density[None, :] > density[:, None]) | equal  # (M, M): j denser than i
    farthest = distance.max()
    parent = torch.where(denser, distance, farthest).min(dim=-1).values  # (M,)
    score = parent * density
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]  # (K,)
    assignment = distance[centres].argmin(dim=0)  # (M,) the nearest centre, first on ties
    assignment[centres] = torch.arange(clusters, device=tokens.device)
    return assignment, centres


def cluster_weights(assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """(M,) each token's weight in its cluster's token: 1 / (n + 1e-6) for a cluster of n
    (the release's ``cluster_and_merge``: a mean but for its 1e-6)."""
    sizes = torch.bincount(assignment, minlength=clusters).double()  # (K,)
    return 1.0 / (sizes[assignment] + 1e-6)
