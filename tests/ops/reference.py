"""A slow, per-token transcription of PruMerge from the paper's description.

It shares no code with prumerge.ops: plain Python loops over rows and tokens, numpy
percentiles, sorted() with explicit tie-breaking. The batched ops must agree with it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch


def spatial_order(rows: int, cols: int) -> list[int]:
    """Farthest-point order of the grid cells, ties to the lower raster index."""
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    first = min(
        range(len(cells)), key=lambda j: ((cells[j][0] - cy) ** 2 + (cells[j][1] - cx) ** 2, j)
    )
    order = [first]
    chosen = {first}
    while len(order) < len(cells):
        best, best_dist = -1, -1.0
        for j, (r, c) in enumerate(cells):
            if j in chosen:
                continue
            dist = min((r - cells[o][0]) ** 2 + (c - cells[o][1]) ** 2 for o in order)
            if dist > best_dist:
                best, best_dist = j, dist
        order.append(best)
        chosen.add(best)
    return order


def prumerge_row(
    x: torch.Tensor,
    keys: torch.Tensor,
    attn: torch.Tensor,
    *,
    keep=None,
    knn=32,
    plus=False,
    grid=None,
    supplement=True,
    merge="sum",
    whisker=1.5,
    min_keep=1,
    uniform_factor=3.0,
    order="raster",
    spatial="stride",
) -> tuple[torch.Tensor, list[int]]:
    """One image: returns (output tokens (L, C) float64, patch index per token, -1 = supplement)."""
    n = attn.shape[0]
    a = [float(v) for v in attn.float()]
    feats = x.double()
    if keep is None:
        q1, q3 = np.percentile(np.asarray(attn.float()), [25, 75])
        fence = q3 + whisker * (q3 - q1)
        n_attn = max(min(min_keep, n), sum(1 for v in attn.float().tolist() if v > fence))
        n_uniform = min(n - n_attn, round(n_attn * uniform_factor)) if plus else None
        use_supplement = supplement
    else:
        budget = min(keep, n) if isinstance(keep, int) else max(1, min(n, round(keep * n)))
        use_supplement = supplement and 2 <= budget < n
        n_select = budget - 1 if use_supplement else budget
        n_attn = max(1, math.ceil(n_select / (1 + uniform_factor))) if plus else n_select
        n_uniform = n_select - n_attn
    by_attention = sorted(range(n), key=lambda j: (-a[j], j))
    picked = list(by_attention[:n_attn])
    samples = []
    if plus and spatial == "grid":
        rows, cols = grid or (math.isqrt(n), math.isqrt(n))
        for cell in spatial_order(rows, cols):
            if len(samples) == n_uniform:
                break
            if cell not in picked:
                samples.append(cell)
    elif plus and keep is None:
        # The released rule: every s-th index below N - 1, s = int(int(1 / ratio) / 3);
        # where s < 2, the real stride N / (3 * outliers).
        stride = Fraction(int(int(1 / (n_attn / n)) / uniform_factor))
        if stride < 2:
            stride = Fraction(n) / (Fraction(uniform_factor) * n_attn)
        candidates, k = [], 0
        while math.floor(k * stride) < n - 1:
            if math.floor(k * stride) not in candidates:
                candidates.append(math.floor(k * stride))
            k += 1
        samples = [c for c in candidates if c not in picked]
    elif plus:
        rest = [j for j in range(n) if j not in picked]
        samples = [rest[(k * len(rest)) // n_uniform] for k in range(n_uniform)]
    if order == "raster":
        chosen = sorted(picked + samples)
    else:  # the released order: attention picks by attention, then the samples by index
        chosen = sorted(picked, key=lambda j: (-a[j], j)) + sorted(samples)
    use_supplement = use_supplement and len(chosen) < n
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    out = []
    for i in chosen:
        token = feats[i].clone()
        k = min(knn, n - 1)
        if merge != "none" and k > 0 and len(chosen) < n:
            sims = [(float(unit[i] @ unit[j]), j) for j in range(n) if j != i]
            neighbours = [j for _, j in sorted(sims, key=lambda t: (-t[0], t[1]))[:k]]
            weighted = sum(a[j] * feats[j] for j in neighbours)
            if merge == "sum":
                token = token + weighted
            else:
                token = (a[i] * token + weighted) / (a[i] + sum(a[j] for j in neighbours))
        out.append(token)
    index = list(chosen)
    if use_supplement:
        out.append(sum(a[j] * feats[j] for j in range(n) if j not in chosen))
        index.append(-1)
    return torch.stack(out), index
