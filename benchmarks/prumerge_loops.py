"""Adaptive PruMerge written as loops, for ``ops_speed.py`` to time against the batched op.

Both compute what ``prumerge.ops.prumerge`` computes in adaptive mode (per-row IQR fence,
raster order, the summed supplement token), with tensor ops inside and Python loops over rows
and kept tokens outside; ``ops_speed.py`` prints each one's largest difference to the op.
"""

from __future__ import annotations

import torch


def prumerge_loop(
    x: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, *, knn: int = 32
) -> list[torch.Tensor]:
    """Adaptive PruMerge with the released code's loop structure: rows x kept tokens.

    Tensor ops inside, Python loops outside, as the released code runs it (but with the
    per-row IQR fence and raster order of the batched op). Used by the speed benchmark.
    """
    outputs = []
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    for b in range(x.shape[0]):
        row = attn[b].float()
        q1, q3 = torch.quantile(row, torch.tensor([0.25, 0.75]))
        count = max(1, int((row > q3 + 1.5 * (q3 - q1)).sum()))
        order = torch.sort(row, descending=True, stable=True).indices
        chosen = torch.sort(order[:count]).values
        tokens = []
        for i in chosen.tolist():
            sims = unit[b] @ unit[b, i]
            sims[i] = float("-inf")
            nearest = torch.sort(sims, descending=True, stable=True).indices[
                : min(knn, len(row) - 1)
            ]
            tokens.append(x[b, i].float() + (row[nearest, None] * x[b, nearest].float()).sum(0))
        pruned = torch.ones_like(row, dtype=torch.bool)
        pruned[chosen] = False
        tokens.append((row[pruned, None] * x[b, pruned].float()).sum(0))
        outputs.append(torch.stack(tokens))
    return outputs


def prumerge_released_loop(
    x: torch.Tensor, keys: torch.Tensor, attn: torch.Tensor, *, knn: int = 32
) -> list[torch.Tensor]:
    """Adaptive PruMerge run the way the released code runs it, for the speed benchmark.

    Same results as ``prumerge_loop`` (per-row fence, raster order), but each kept token
    rebuilds the "all other tokens" tensors by concatenating the kept tokens before and after
    it with the pruned ones, as the released code's rows x tokens double loop does, before
    its similarity product and top-k.
    """
    outputs = []
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    for b in range(x.shape[0]):
        row = attn[b].float()
        q1, q3 = torch.quantile(row, torch.tensor([0.25, 0.75]))
        count = max(1, int((row > q3 + 1.5 * (q3 - q1)).sum()))
        chosen = torch.sort(torch.sort(row, descending=True, stable=True).indices[:count]).values
        pruned_mask = torch.ones_like(row, dtype=torch.bool)
        pruned_mask[chosen] = False
        pruned = pruned_mask.nonzero().flatten()
        kept_x, kept_a, kept_k = x[b, chosen].float(), row[chosen], unit[b, chosen]
        rest_x, rest_a, rest_k = x[b, pruned].float(), row[pruned], unit[b, pruned]
        tokens = []
        for i in range(count):
            other_k = torch.cat([kept_k[:i], kept_k[i + 1 :], rest_k])
            other_x = torch.cat([kept_x[:i], kept_x[i + 1 :], rest_x])
            other_a = torch.cat([kept_a[:i], kept_a[i + 1 :], rest_a])
            sims = (kept_k[i : i + 1] @ other_k.T)[0]
            nearest = sims.topk(min(knn, len(sims))).indices
            tokens.append(kept_x[i] + (other_a[nearest, None] * other_x[nearest]).sum(0))
        tokens.append((rest_a[:, None] * rest_x).sum(0))
        outputs.append(torch.stack(tokens))
    return outputs
