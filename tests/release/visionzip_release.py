"""VisionZip as the released code computes it, one image at a time.

Transcribed (our own code, written from reading it) from dvlab-research/VisionZip at commit
3151f6df4fca36a4cd1c985e5956e725b1f9ad02: ``visionzip/main.py`` (``visionzip(model,
dominant, contextual)`` keeps ``dominant - 1`` patches besides [CLS]), ``visionzip/utils.py``
(``CLIPAttention_forward`` returns ``raw_key_states.mean(1)``, the keys averaged over heads,
which ``CLIP_EncoderLayer_forward`` stores as ``metric`` on layer 22 of 24, the one
``r = [0] * 22 + [1] + [0]`` marks) and ``visionzip/clip_encoder.py``
(``CLIPVisionTower_VisionZip.forward``):

1. ``attentions[-2]`` and ``hidden_states[-2]`` (the layer that outputs the selected
   features), the metric of ``layers[-2]``.
2. Dominant: the [CLS] row of the attention summed over heads, patches only; the top
   ``dominant - 1`` patches, plus [CLS]; gathered in index order ([CLS] first).
3. The rest (index order), metric normalised; ``step = max(1, R // contextual)``, targets
   = every step-th of the rest, the first ``contextual`` of them.
4. Every other remaining token joins the target with the largest cosine similarity.
5. Contextual token = target + sum(members) / max(members, 1).
6. Output: dominant tokens, then contextual tokens.
"""

from __future__ import annotations

import torch


def visionzip_release(
    hidden: torch.Tensor,
    attentions: torch.Tensor,
    key_states: torch.Tensor,
    *,
    dominant: int,
    contextual: int,
) -> tuple[torch.Tensor, list[int]]:
    """One image through the release's VisionZip.

    Args:
        hidden: (1 + N, C) ``hidden_states[-2]``, [CLS] first.
        attentions: (heads, 1 + N, 1 + N) ``attentions[-2]``.
        key_states: (heads, 1 + N, d) the keys of the same layer, per head.
        dominant: the release's ``dominant`` argument ([CLS] counts as one).
        contextual: contextual tokens.

    Returns:
        (dominant + contextual, C) float64 tokens, and the token index (into hidden: 0 is
        [CLS], j + 1 is patch j) of every dominant token.
    """
    length = hidden.shape[0]
    cls_score = attentions[:, 0, 1:].double().sum(dim=0).tolist()  # summed over heads
    by_score = sorted(range(length - 1), key=lambda j: (-cls_score[j], j))
    kept = sorted([0] + [j + 1 for j in by_score[: dominant - 1]])
    x = hidden.double()
    metric = key_states.double().mean(dim=0)  # (1 + N, d) averaged over heads
    rest = [t for t in range(length) if t not in kept]
    unit = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    members: dict[int, list[int]] = {t: [] for t in targets}
    for position in range(len(rest)):
        if position in targets:
            continue
        similarity = (unit[targets] @ unit[position]).tolist()
        members[targets[similarity.index(max(similarity))]].append(position)
    out = [x[t] for t in kept]
    for t in targets:
        joined = sum((x[rest[p]] for p in members[t]), torch.zeros_like(x[0]))
        out.append(x[rest[t]] + joined / max(len(members[t]), 1))
    return torch.stack(out), kept
