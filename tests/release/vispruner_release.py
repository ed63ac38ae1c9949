"""VisPruner's selection as the released code computes it, one image at a time.

Transcribed (our own code, written from reading it) from Theia-4869/VisPruner at commit
aefa01adc7c7ce6334e880c88225e90cede760d1: ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.feature_select``: ``hidden_states[-2][:, 1:]`` and
``attentions[-2][:, :, 0, 1:]``) and ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``, the "[VisPruner]" blocks: heads averaged, argsort
descending, int(T * r) important; the rest thinned in rounds of r = min(8, R - T_div) by the
max cosine similarity of the even-place tokens to the odd-place ones; a mask, so raster order).
"""

from __future__ import annotations

import math

import torch


def vispruner_release(
    hidden: torch.Tensor, attentions: torch.Tensor, count: int, important_ratio: float
) -> tuple[torch.Tensor, list[int]]:
    """The kept patch tokens of one image (pre-projector) and their indices.

    Args:
        hidden: (1 + N, C) ``hidden_states[-2]``, [CLS] first.
        attentions: (heads, 1 + N, 1 + N) ``attentions[-2]``.
        count: ``visual_token_num`` T.
        important_ratio: r.
    """
    heads = attentions.shape[0]
    n = hidden.shape[0] - 1
    score = [sum(float(attentions[h, 0, 1 + j]) for h in range(heads)) / heads for j in range(n)]
    ranked = sorted(range(n), key=lambda j: -score[j])
    n_imp = int(count * important_ratio)
    n_div = count - n_imp
    important, residual = ranked[:n_imp], ranked[n_imp:]
    feats = [hidden[1 + j].double() for j in range(n)]
    unit = [f / math.sqrt(float(f @ f)) for f in feats]
    while n_div > 0:
        r = min(8, len(residual) - n_div)
        if r <= 0:
            break
        evens, odds = residual[0::2], residual[1::2]
        best = [max(float(unit[a] @ unit[b]) for b in odds) for a in evens]
        by_best = sorted(range(len(evens)), key=lambda i: -best[i])
        residual = [evens[i] for i in by_best[r:]] + odds
    kept = sorted(important + (residual if n_div > 0 else []))
    return torch.stack([feats[j] for j in kept]), kept
