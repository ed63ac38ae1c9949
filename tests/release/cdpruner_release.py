"""CDPruner's selection as the released code computes it, for one image (batch 1, where the
release's batch-wide min-max is the image's own).

Transcribed (our own code, written from reading it) from Theia-4869/CDPruner at commit
9541616c40fcd5625de1cdb8ea6c33c129eb7864: ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``, the "[CDPruner]" blocks: cosine similarity of the
projector's outputs; relevance = mean over the text rows of the negative cosine between the
CLIP image embeds and text embeds, then (r - min + 1e-6) / (max - min); kernel
r_i S_ij r_j; greedy fast MAP inference for ``visual_token_num`` steps: pick argmax of the
residual diagonal, e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j), d -= e^2, d_j = -inf; sorted
indices -> a mask) and ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.forward``: image embeds = ``visual_projection(post_layernorm(...))``, text
embeds = ``CLIPTextModelWithProjection(...).text_embeds``).
"""

from __future__ import annotations

import math

import torch


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float(v @ v))


def cdpruner_release(
    projected: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, count: int
) -> tuple[torch.Tensor, list[int]]:
    """The kept (projected) tokens of one image and their indices.

    Args:
        projected: (N, D) the projector's outputs of the patches.
        image_embeds: (N, E) each patch in the text's space.
        text_embeds: (M, E) the instruction's rows.
        count: ``visual_token_num``.
    """
    n = projected.shape[0]
    x = torch.stack([_unit(v.double()) for v in projected])
    similarity = x @ x.T
    e = [_unit(v.double()) for v in image_embeds]
    t = [_unit(v.double()) for v in text_embeds]
    raw = [sum(-float(ei @ tm) for tm in t) / len(t) for ei in e]
    low, high = min(raw), max(raw)
    r = torch.tensor([(v - low + 1e-6) / (high - low) for v in raw], dtype=torch.float64)
    kernel = r[:, None] * similarity * r[None, :]
    diag = kernel.diagonal().clone()
    factors: list[torch.Tensor] = []
    picks: list[int] = []
    for _ in range(count):
        j = int(diag.argmax())
        picks.append(j)
        e_j = kernel[j].clone()
        for c in factors:
            e_j -= c[j] * c
        e_j /= math.sqrt(float(diag[j]))
        factors.append(e_j)
        diag -= e_j**2
        diag[j] = -float("inf")
    kept = sorted(picks)
    assert len(set(kept)) == n or len(set(kept)) == count
    return torch.stack([projected[j].double() for j in kept]), kept
