"""ToMe bipartite soft matching (Bolya et al., ICLR 2023), repeated down to a token budget."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, validate_inputs, work_dtype
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, inverse_permutation


def _merge_round(
    values: list[torch.Tensor], unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor
) -> list[torch.Tensor]:
    """One round of merging for each (B, t, D) tensor: [unmerged A tokens, B tokens + merged].

    Values are sums (features times size, sizes, keys times size), so adding is merging.
    """
    out = []
    for value in values:
        depth = value.shape[-1]
        src, dst = value[:, ::2], value[:, 1::2]  # (B, ta, D), (B, tb, D)
        kept = src.gather(1, unm_idx[..., None].expand(-1, -1, depth))
        moved = src.gather(1, src_idx[..., None].expand(-1, -1, depth))
        dst = dst.scatter_add(1, dst_idx[..., None].expand(-1, -1, depth), moved)
        out.append(torch.cat([kept, dst], dim=1))
    return out


def tome(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    *,
    keep: int | float = 64,
    r: int | None = None,
) -> Reduction:
    """Merge similar tokens by ToMe's bipartite soft matching until ``keep`` remain.

    Each round, as in ToMe: the current tokens alternate into sets A (even positions) and B
    (odd positions); every A token finds its most cosine-similar B token by key; the ``r_t``
    A tokens with the most similar matches merge into their B partners, and the sequence
    becomes [unmatched A tokens, B tokens]. Rounds repeat until the budget is met, merging
    r_t = min(r, t // 2, t - keep) tokens each (t tokens at the start of the round).

    Merges are size-weighted: every token carries the number of patches it holds, and a
    merged token is the size-weighted mean of its parts, so sum_i size_i * x_i over the
    output equals the sum of the input patches. With one layer's keys and no encoder
    layers in between, the key of a merged token is the size-weighted mean of its parts'
    keys (the key projection is linear up to its LayerNorm), which is the next round's metric.

    Output tokens come in raster order of their representative patch: the B token that
    absorbed the others (across rounds, the root of its merge tree). ``index`` holds that
    patch and ``assignment`` the output slot of every patch's group.

    Args:
        tokens: (B, N, C) patch features.
        keys: (B, N, Ck) patch keys, the similarity metric (ToMe uses keys averaged over
            heads; cosine similarity makes any per-patch key work).
        keep: output tokens per image, an int count or a float ratio of N.
        r: most tokens merged per round; None merges as many as one matching allows (half
            the tokens), which needs the fewest rounds. ToMe itself merges a fixed r per
            encoder layer; a small r here re-matches after every few merges.

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N, unchanged, if keep >= N).
    """
    validate_inputs(tokens, keys=keys)
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"r must be None or an int >= 1; got {r!r}")
    batch, num, _ = tokens.shape
    device = tokens.device
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)

    dtype = work_dtype(tokens)
    x_sum = tokens.to(dtype)  # (B, t, C) size-weighted feature sums
    size = torch.ones(batch, num, 1, dtype=dtype, device=device)  # (B, t, 1)
    k_sum = keys.to(dtype)  # (B, t, Ck) size-weighted key sums
    representative = torch.arange(num, device=device).expand(batch, num)  # (B, t) patch ids
    slot = representative.clone()  # (B, N) current position of every patch's token
    t = num
    while t > budget:
        r_t = min(t // 2, t - budget, r if r is not None else num)
        # normalize(key sum) = normalize(size-weighted mean key).
        metric = F.normalize(k_sum, dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, ta, tb)
        best_match = scores.argmax(dim=-1)  # (B, ta); ties to the lower B index
        best_score = scores.gather(2, best_match[..., None]).squeeze(2)
        edge = torch.sort(best_score, dim=1, descending=True, stable=True).indices  # (B, ta)
        unm_idx, src_idx = edge[:, r_t:], edge[:, :r_t]
        dst_idx = best_match.gather(1, src_idx)  # (B, r_t)
        x_sum, size, k_sum = _merge_round([x_sum, size, k_sum], unm_idx, src_idx, dst_idx)

        # Where each of this round's t tokens lands among the t - r_t new ones.
        n_a = (t + 1) // 2
        n_unm = n_a - r_t
        arange_unm = torch.arange(n_unm, device=device).expand(batch, n_unm)
        new_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
        new_a.scatter_(1, unm_idx, arange_unm).scatter_(1, src_idx, n_unm + dst_idx)
        new_b = n_unm + torch.arange(t // 2, device=device).expand(batch, t // 2)
        remap = torch.empty(batch, t, dtype=torch.long, device=device)
        remap[:, ::2] = new_a
        remap[:, 1::2] = new_b
        slot = remap.gather(1, slot)
        representative = torch.cat(
            [representative[:, ::2].gather(1, unm_idx), representative[:, 1::2]], dim=1
        )
        t -= r_t

    # Raster order of the representatives.
    order = torch.argsort(representative, dim=1)  # (B, K); representatives are distinct
    merged = (x_sum / size).gather(1, order[..., None].expand(-1, -1, x_sum.shape[-1]))
    return Reduction(
        tokens=merged.to(tokens.dtype),
        lengths=torch.full((batch,), budget, dtype=torch.long, device=device),
        index=representative.gather(1, order),
        assignment=inverse_permutation(order).gather(1, slot),
        attention_selected=torch.zeros(batch, num, dtype=torch.bool, device=device),
    )
