"""DivPrune as the released code computes it, one image at a time.

Transcribed (our own code, written from reading it; the release is CC BY-NC and none of it
is copied) from vbdi/divprune, ``LLaVA/llava/model/llava_arch.py`` at commit
799e2d950aa01ba7860907f5a6d86061f885dca6: ``LlavaMetaForCausalLM.DivPrune`` and its call at
the end of ``prepare_inputs_labels_for_multimodal`` (``LAYER_INDEX=0``):

1. The visual tokens are the LLM's input embeddings of the image, i.e. the projector's
   outputs (``new_input_embeds[0][35:35 + img_feature_len]``, batch row 0 only).
2. ``threshold_terms = int(round(SUBSET_RATIO * N))`` tokens are picked.
3. d = 1 - cosine similarity of every pair (N x N).
4. First pick: the column whose second-smallest distance is largest (the smallest is the
   token's distance to itself); later picks: the column whose smallest distance to the
   picked rows is largest (``argmax``: the first maximum).
5. The picked tokens are kept in index order (``keep_indexs.sort()``).
"""

from __future__ import annotations

import torch


def divprune_release(tokens: torch.Tensor, count: int) -> list[int]:
    """The indices (in index order) of the ``count`` tokens DivPrune keeps of (N, H) tokens."""
    unit = tokens.double() / tokens.double().norm(dim=1, keepdim=True)
    distance = [1.0 - unit @ row for row in unit]  # distance[i][j], one row per token
    picked: list[int] = []
    for step in range(count):
        if step == 0:  # every column's second-smallest distance
            scores = torch.stack(distance).sort(dim=0).values[1].tolist()
        else:  # every column's smallest distance to a picked row
            scores = torch.stack([distance[i] for i in picked]).min(dim=0).values.tolist()
        picked.append(scores.index(max(scores)))
    return sorted(picked)
