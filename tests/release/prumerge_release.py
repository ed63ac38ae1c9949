"""PruMerge and PruMerge+ as the released code computes them, one image at a time.

Transcribed (our own code, written from reading it) from 42Shawn/LLaVA-PruMerge,
``llava/model/multimodal_encoder/clip_encoder.py``: ``CLIPVisionTower``'s
``token_prune_merge_advanced`` (PruMerge) and ``token_prune_merge_advanced_plus``
(PruMerge+, the one ``forward`` calls, ``if_adaptive=True``), at commit
097c04116a58465e4bcb58cec44a94018a68ff1a (the file as of 5632f5ad25e0fd47fd6a588c6a139277b65b2a1f).

What the release does, per call (a batch of B images):

1. Hooks on ``layers[23].self_attn.q_proj`` / ``k_proj`` (the layer whose input is the
   selected hidden state, -2): q, k of shape (B, 1 + N, C).
2. attn = softmax(q @ k^T * C^-0.5) over all 1 + N keys, one head of full width;
   cls_attn = attn[:, 0, 1:].
3. ``outlier_dectection``: numpy percentiles Q1, Q3 of the FLATTENED batch's cls_attn; the
   outliers are the values > Q3 + 1.5 (Q3 - Q1); ratio = outliers / (B * N).
4. topk(cls_attn, int(N * ratio)) per row, largest first.
5. PruMerge+ only: step_length = int(1 / ratio); the indices arange(0, 575, int(step_length
   / 3)) that are not among the kept ones of the flattened batch are appended (a (1, S) row
   concatenated to a (B, k) index: B = 1 only).
6. Every kept token i: its 32 most key-cosine-similar tokens among all others (the other
   kept tokens first, then the complement in ascending index order), token = x_i +
   sum_j a_j x_j with a_j the cls attention, not normalised.
7. One extra token: sum_j a_j x_j over the complement.
8. Output: the kept tokens in index order (attention picks by descending attention, then
   PruMerge+'s samples), then the extra token.

Here everything runs for one image (B = 1), the only batch size at which PruMerge+ runs and
at which the fence is not shared between images; prumerge computes each image alone, and
the tests call this once per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def release_cls_attention(q: torch.Tensor, k: torch.Tensor) -> list[float]:
    """The [CLS] row of single-head, full-width softmax attention, without the [CLS] column.

    Args:
        q: (1 + N, C) queries of one image.
        k: (1 + N, C) keys of the same layer.
    """
    width = q.shape[1]
    logits = [float(q[0].double() @ k[j].double()) * width**-0.5 for j in range(k.shape[0])]
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    return [w / total for w in weights[1:]]


def outlier_count(cls_attn: list[float]) -> int:
    """The release's ``outlier_dectection``, as a count (numpy percentiles, 1.5 IQR)."""
    values = np.asarray(cls_attn, dtype=np.float32)
    q1 = np.percentile(values, 25)
    q3 = np.percentile(values, 75)
    return int((values > q3 + 1.5 * (q3 - q1)).sum())


def prumerge_release(
    features: torch.Tensor,
    keys: torch.Tensor,
    cls_attn: list[float],
    *,
    plus: bool,
    knn: int = 32,
) -> tuple[torch.Tensor, list[int]]:
    """One image through the release's PruMerge (``plus=False``) or PruMerge+.

    Args:
        features: (N, C) the selected layer's patch features (no [CLS]).
        keys: (N, C) the patch keys of layer 23 (its [CLS] row dropped).
        cls_attn: N floats, e.g. from ``release_cls_attention``.
        plus: PruMerge+'s spatial samples.
        knn: 32 in the release.

    Returns:
        (L, C) float64 output tokens and, per token, the patch it is (-1: the extra token).
    """
    n = features.shape[0]
    ratio = outlier_count(cls_attn) / n
    count = int(n * ratio)
    by_attention = sorted(range(n), key=lambda j: (-cls_attn[j], j))
    kept = by_attention[:count]
    if plus:
        step_length = int(1 / ratio)
        kept = kept + [x for x in range(0, n - 1, int(step_length / 3)) if x not in kept]
    complement = [j for j in range(n) if j not in kept]
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    x = features.double()
    out = []
    weight = torch.tensor(cls_attn, dtype=torch.float64)
    for position, i in enumerate(kept):
        others = kept[:position] + kept[position + 1 :] + complement
        similarity = unit[others] @ unit[i]  # cosine to every other token
        ranked = torch.sort(similarity, descending=True, stable=True).indices[:knn]
        nearest = [others[o] for o in ranked.tolist()]
        out.append(x[i] + (weight[nearest, None] * x[nearest]).sum(dim=0))
    out.append((weight[complement, None] * x[complement]).sum(dim=0))
    return torch.stack(out), kept + [-1]
