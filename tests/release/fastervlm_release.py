"""FasterVLM's [CLS]-attention top-k (the method prumerge calls ``cls_topk``) as the released
code computes it, one image at a time.

Transcribed (our own code, written from reading it) from Theia-4869/FasterVLM at commit
f5d5f12037e105a51865ecb4b28a73cd86eb4921: ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.feature_select``: ``hidden_states[select_layer][:, 1:]`` and
``attentions[select_layer][:, :, 0, 1:]``, select_layer = -2: the layer that outputs the
features) and ``llava/model/llava_arch.py`` (``encode_images``: the attention averaged over
heads, ``topk(visual_token_num)``, a mask; ``prepare_inputs_labels_for_multimodal`` keeps the
masked tokens of the projected features, in index order).
"""

from __future__ import annotations

import torch


def fastervlm_release(
    hidden: torch.Tensor, attentions: torch.Tensor, count: int
) -> tuple[torch.Tensor, list[int]]:
    """The kept patch tokens of one image and their indices.

    Args:
        hidden: (1 + N, C) ``hidden_states[-2]``, [CLS] first.
        attentions: (heads, 1 + N, 1 + N) ``attentions[-2]``.
        count: ``visual_token_num``.
    """
    heads = attentions.shape[0]
    n = hidden.shape[0] - 1
    score = [float(sum(attentions[h, 0, 1 + j] for h in range(heads))) / heads for j in range(n)]
    kept = sorted(sorted(range(n), key=lambda j: (-score[j], j))[:count])
    return torch.stack([hidden[1 + j].double() for j in kept]), kept
