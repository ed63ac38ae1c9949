"""HiPrune's selection as the released code computes it, one image at a time (batch 1, so the
release's ``int(HIPRUNE_RETENTION / B)`` is the whole budget).

Transcribed (our own code, written from reading it) from Danielement321/HiPrune at commit
6e83a1240874e99a25df34f54221a29bb24b7bc2: ``LLaVA/llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``: "global attention" = ``attentions[l].mean(heads)
.mean(queries)[1:]`` for the object layer ``l = HIPRUNE_OBJECT_LAYER - 1`` and the deep layer
``mm_vision_select_layer``; ``round(T * alpha / 5)`` anchors by topk; each anchor with its
offsets -1, +1, -24, +24 clamped to [0, 575] and de-duplicated; the rest of the budget the
topk of the deep attention with the chosen ones lowered by 1; a mask, so raster order) and
``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` (``output_attentions=True``,
hidden_states[-2][:, 1:]). The grid width 24 and the last patch 575 are LLaVA-1.5's; the
transcription takes them from N (``cols``, ``N - 1``) so that it also runs at N = 256.
"""

from __future__ import annotations

import math

import torch


def global_attention(attention: torch.Tensor) -> list[float]:
    """(heads, 1 + N, 1 + N) -> the attention each patch receives, heads and queries averaged."""
    return attention.double().mean(dim=0).mean(dim=0)[1:].tolist()


def hiprune_release(
    hidden: torch.Tensor,
    object_attention: torch.Tensor,
    deep_attention: torch.Tensor,
    count: int,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, list[int]]:
    """The kept patch tokens of one image (pre-projector) and their indices.

    Args:
        hidden: (1 + N, C) ``hidden_states[-2]``, [CLS] first.
        object_attention: (heads, 1 + N, 1 + N) ``attentions[HIPRUNE_OBJECT_LAYER - 1]``.
        deep_attention: (heads, 1 + N, 1 + N) ``attentions[-2]``.
        count: ``HIPRUNE_RETENTION``.
        alpha: ``HIPRUNE_ALPHA``.
    """
    n = hidden.shape[0] - 1
    cols = math.isqrt(n)
    shallow = global_attention(object_attention)
    deep = global_attention(deep_attention)
    n_anchors = round(count * alpha / 5)
    assert 5 * n_anchors <= count, "the release's topk of a negative count raises"
    anchors = sorted(range(n), key=lambda j: -shallow[j])[:n_anchors]
    chosen = set()
    for offset in (0, -1, 1, -cols, cols):
        chosen |= {min(max(a + offset, 0), n - 1) for a in anchors}
    lowered = [deep[j] - (1 if j in chosen else 0) for j in range(n)]
    registers = sorted(range(n), key=lambda j: -lowered[j])[: count - len(chosen)]
    kept = sorted(chosen | set(registers))
    return torch.stack([hidden[1 + j].double() for j in kept]), kept
