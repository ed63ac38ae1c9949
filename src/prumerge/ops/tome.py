"""ToMe bipartite soft matching (Bolya et al., ICLR 2023): one matching, the bookkeeping of a
sequence of merges, the per-layer schedule of a token budget, and merging down to a budget
after the tower."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prumerge.ops.keep import full_reduction, validate_inputs, work_dtype
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count, inverse_permutation

#: Output orders of the merged tokens: "raster", by the patch each token stands for; "tome",
#: the order the matchings leave them in (unmerged A tokens, then the B tokens).
TOME_ORDERS = ("raster", "tome")


@dataclass
class Matching:
    """One bipartite soft matching of t tokens: A = even positions, B = odd positions.

    Attributes:
        unmerged: (B, ta - r) A positions (within A) that stay.
        sources: (B, r) A positions that merge away.
        destinations: (B, r) B positions (within B) each source merges into.
    """

    unmerged: torch.Tensor
    sources: torch.Tensor
    destinations: torch.Tensor

    def merge(self, values: torch.Tensor) -> torch.Tensor:
        """(B, t, D) -> (B, t - r, D): [unmerged A tokens, B tokens + their sources], summed."""
        depth = values.shape[-1]
        src, dst = values[:, ::2], values[:, 1::2]  # (B, ta, D), (B, tb, D)
        kept = src.gather(1, self.unmerged[..., None].expand(-1, -1, depth))
        moved = src.gather(1, self.sources[..., None].expand(-1, -1, depth))
        dst = dst.scatter_add(1, self.destinations[..., None].expand(-1, -1, depth), moved)
        return torch.cat([kept, dst], dim=1)


def bipartite_matching(
    metric: torch.Tensor, r: int, *, protected: int = 0, sort_unmerged: bool = False
) -> Matching:
    """ToMe's bipartite soft matching of the tokens (``bipartite_soft_matching``).

    The tokens alternate into A (even positions) and B (odd positions); every A token finds
    its most cosine-similar B token; the r A tokens with the most similar matches merge into
    them. The first ``protected`` tokens never merge (ToMe protects the [CLS] token, the
    first A token): their A rows and B columns are excluded. Ties: the first maximum, and a
    stable sort of the match scores (the lower A position first).

    Args:
        metric: (B, t, D) per-token metric (ToMe: the layer's keys averaged over heads).
        r: tokens to merge away; clamped to (t - protected) // 2, as ToMe does.
        protected: leading tokens that never merge.
        sort_unmerged: keep the unmerged A tokens in their order (ToMe does when it protects
            a [CLS] token, so that it stays first); else they follow the match scores.

    Returns:
        The ``Matching``; its ``sources`` are empty when nothing merges.
    """
    t = metric.shape[1]
    r = max(0, min(r, (t - protected) // 2))
    unit = F.normalize(metric.to(work_dtype(metric)), dim=-1)
    scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # (B, ta, tb)
    if protected:
        a_pos = torch.arange(0, t, 2, device=metric.device)
        b_pos = torch.arange(1, t, 2, device=metric.device)
        scores = scores.masked_fill((a_pos < protected)[None, :, None], -math.inf)
        scores = scores.masked_fill((b_pos < protected)[None, None, :], -math.inf)
    best_score, best_match = scores.max(dim=-1)  # (B, ta)
    edge = torch.sort(best_score, dim=1, descending=True, stable=True).indices  # (B, ta)
    unmerged, sources = edge[:, r:], edge[:, :r]
    if sort_unmerged:
        unmerged = unmerged.sort(dim=1).values
    return Matching(unmerged, sources, best_match.gather(1, sources))


class TokenMerger:
    """The state of a sequence of size-weighted merges of one batch of token sequences.

    It holds every current token's size (the number of original tokens it holds), the
    original token it stands for (A tokens stay themselves, a B token keeps its own as its
    sources join it) and, for every original token, the current token that holds it.

    Args:
        batch: rows.
        length: tokens per row at the start (prefix tokens included).
        device: where the bookkeeping lives.
    """

    def __init__(self, batch: int, length: int, device: torch.device | str) -> None:
        self.size = torch.ones(batch, length, 1, device=device)  # (B, t, 1)
        self.representative = torch.arange(length, device=device).expand(batch, length)
        self.slot = self.representative.clone()  # (B, length) current position of each token

    @property
    def length(self) -> int:
        return self.size.shape[1]

    def merge(self, values: list[torch.Tensor], matching: Matching) -> list[torch.Tensor]:
        """Apply ``matching`` to each (B, t, D) tensor as ToMe's ``merge_wavg`` does: the
        size-weighted mean of every merged group; sizes and bookkeeping follow."""
        new_size = matching.merge(self.size)
        merged = [matching.merge(v * self.size.to(v.dtype)) / new_size.to(v.dtype) for v in values]
        batch, t = self.size.shape[:2]
        device = self.size.device
        r = matching.sources.shape[1]
        n_a, n_b = (t + 1) // 2, t // 2
        n_unm = n_a - r
        # Where each of the t tokens lands among the t - r new ones.
        new_a = torch.empty(batch, n_a, dtype=torch.long, device=device)
        new_a.scatter_(1, matching.unmerged, torch.arange(n_unm, device=device).expand(batch, -1))
        new_a.scatter_(1, matching.sources, n_unm + matching.destinations)
        remap = torch.empty(batch, t, dtype=torch.long, device=device)
        remap[:, ::2] = new_a
        remap[:, 1::2] = n_unm + torch.arange(n_b, device=device).expand(batch, n_b)
        self.slot = remap.gather(1, self.slot)
        self.representative = torch.cat(
            [
                self.representative[:, ::2].gather(1, matching.unmerged),
                self.representative[:, 1::2],
            ],
            dim=1,
        )
        self.size = new_size
        return merged

    def reduction(
        self, tokens: torch.Tensor, *, prefix: int = 0, order: str = "raster"
    ) -> Reduction:
        """The ``Reduction`` of the patches: the merged tokens after the ``prefix`` ones.

        Args:
            tokens: (B, prefix + K, C) the current tokens (prefix tokens, never merged, first).
            prefix: leading tokens that are no patches ([CLS]); patch p is token prefix + p.
            order: ``"raster"`` sorts the K tokens by the patch they stand for; ``"tome"``
                keeps the order the merges left.

        Returns:
            K tokens per row; ``index`` is the patch each stands for, ``assignment`` the
            token holding each patch.
        """
        if order not in TOME_ORDERS:
            raise ValueError(
                f"order must be one of {', '.join(map(repr, TOME_ORDERS))}; got {order!r}"
            )
        batch = tokens.shape[0]
        patches = tokens[:, prefix:]
        representative = self.representative[:, prefix:] - prefix  # (B, K)
        slot = self.slot[:, prefix:] - prefix  # (B, N)
        if order == "raster":
            perm = torch.argsort(representative, dim=1)  # representatives are distinct
            patches = patches.gather(1, perm[..., None].expand(-1, -1, patches.shape[-1]))
            representative = representative.gather(1, perm)
            slot = inverse_permutation(perm).gather(1, slot)
        count = patches.shape[1]
        return Reduction(
            tokens=patches,
            lengths=torch.full((batch,), count, dtype=torch.long, device=tokens.device),
            index=representative,
            assignment=slot,
            attention_selected=torch.zeros(
                batch, slot.shape[1], dtype=torch.bool, device=tokens.device
            ),
        )


def tome_schedule(num_patches: int, keep: int, num_layers: int, *, protected: int = 0) -> list[int]:
    """Tokens to merge in each of ``num_layers`` layers so that exactly ``keep`` patches remain.

    ToMe merges a constant r per layer. The N - keep merges are spread as evenly as that
    allows: r = (N - keep) // L in every layer, and one more in the first (N - keep) % L
    layers. A matching can merge at most half of the unprotected tokens, (t - protected) // 2;
    when the even schedule asks more than that of a late layer, the schedule is the smallest
    constant r for which every layer merging min(r, its half, what is left) meets the budget
    (the late layers merge their half, the early ones r, the last ones possibly nothing).

    Args:
        num_patches: N, patch tokens entering the first layer.
        keep: patches that must remain, 1 <= keep <= N.
        num_layers: L, layers that may merge.
        protected: prefix tokens ([CLS]) that never merge.

    Returns:
        L counts summing to N - keep.

    Raises:
        ValueError: when even merging half of the tokens in every layer cannot reach ``keep``.
    """
    if not 1 <= keep <= num_patches:
        raise ValueError(f"keep must be in [1, {num_patches}]; got {keep}")
    merges = num_patches - keep
    if merges == 0:
        return [0] * num_layers
    if num_layers < 1:
        raise ValueError("the tower has no encoder layer before the selected features to merge in")

    def capped(per_layer: list[int]) -> list[int]:
        schedule, t, left = [], num_patches + protected, merges
        for r in per_layer:
            r = min(r, (t - protected) // 2, left)
            schedule.append(r)
            t, left = t - r, left - r
        return schedule

    even = [merges // num_layers + (1 if i < merges % num_layers else 0) for i in range(num_layers)]
    if capped(even) == even:
        return even
    if sum(capped([merges] * num_layers)) < merges:
        fewest = num_patches - sum(capped([merges] * num_layers))
        raise ValueError(
            f"keep={keep} is out of reach: {num_layers} layers merging at most half of the "
            f"tokens each bring {num_patches} patches down to {fewest} at the fewest"
        )
    # The total merged grows with r (fewer tokens never leave more), so bisect the least r.
    low, high = max(even), merges
    while low < high:
        middle = (low + high) // 2
        if sum(capped([middle] * num_layers)) >= merges:
            high = middle
        else:
            low = middle + 1
    return capped([low] * num_layers)


def tome(
    tokens: torch.Tensor,
    keys: torch.Tensor,
    *,
    keep: int | float = 64,
    r: int | None = None,
) -> Reduction:
    """Merge similar tokens by ToMe's bipartite soft matching until ``keep`` remain, after the
    tower (ToMe itself merges inside the ViT, layer by layer: see ``tome_schedule`` and
    ``TokenMerger``, which the adapters drive).

    Each round is one ``bipartite_matching`` on the current tokens, merging r_t = min(r, t //
    2, t - keep) tokens (t tokens at the start of the round), until the budget is met.
    Merges are size-weighted (``merge_wavg``): a merged token is the size-weighted mean of
    its parts, so sum_i size_i * x_i over the output equals the sum of the input patches.
    With one layer's keys and no encoder layers in between, the key of a merged token is the
    size-weighted mean of its parts' keys, which is the next round's metric.

    Output tokens come in raster order of their representative patch: the B token that
    absorbed the others (across rounds, the root of its merge tree). ``index`` holds that
    patch and ``assignment`` the output slot of every patch's group.

    Args:
        tokens: (B, N, C) patch features.
        keys: (B, N, Ck) patch keys, the similarity metric (ToMe uses keys averaged over
            heads, see ``key_head_mean``; cosine similarity makes any per-patch key work).
        keep: output tokens per image, an int count or a float ratio of N.
        r: most tokens merged per round; None merges as many as one matching allows (half
            the tokens), which needs the fewest rounds.

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N, unchanged, if keep >= N).
    """
    validate_inputs(tokens, keys=keys)
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ValueError(f"r must be None or an int >= 1; got {r!r}")
    batch, num, _ = tokens.shape
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    dtype = work_dtype(tokens)
    x, k = tokens.to(dtype), keys.to(dtype)
    merger = TokenMerger(batch, num, tokens.device)
    while merger.length > budget:
        t = merger.length
        r_t = min(t // 2, t - budget, r if r is not None else num)
        x, k = merger.merge([x, k], bipartite_matching(k, r_t))
    reduction = merger.reduction(x, order="raster")
    reduction.tokens = reduction.tokens.to(tokens.dtype)
    return reduction
