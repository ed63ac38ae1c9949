"""DART's selection (Wen et al., "Stop Looking for Important Tokens in Multimodal Language
Models: Duplication Matters More", EMNLP 2025): keep the image tokens least duplicated by a
few pivot tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pivot_duplication_keep(
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    keep: int,
    *,
    image_pivots: int = 4,
    text_pivots: int = 4,
    image_positions: list[int] | None = None,
    text_positions: list[int] | None = None,
) -> torch.Tensor:
    """The image tokens one image keeps, by duplication against pivot tokens.

    Pivots: the ``image_pivots`` image tokens and the ``text_pivots`` text tokens with the
    largest L1 norm of their keys. Every pivot in turn takes the still-unpicked, non-pivot
    image tokens LEAST cosine-similar to it (on ``*_states``); the image pivots and every
    picked token are kept, ``keep`` in all. The ``keep - image_pivots`` picks are split
    evenly over the pivots, the first pivots taking one more when they do not divide.

    Pivots are visited in the order CPython iterates a ``set`` of their positions (the
    release's order; the greedy picks depend on it), which needs each token's position in
    its sequence (``*_positions``; default: images first, then text, counted from 0).

    Args:
        image_keys: (N, Ck) the image tokens' keys (any fixed layout of heads).
        text_keys: (T, Ck) the text tokens' keys.
        image_states: (N, C) the image tokens' hidden states compared by cosine similarity.
        text_states: (T, C) the text tokens' hidden states.
        keep: image tokens to keep, in [0, N].

    Returns:
        (N,) bool, True for the kept image tokens (``keep`` of them).
    """
    num = image_keys.shape[0]
    device = image_keys.device
    kept = torch.zeros(num, dtype=torch.bool, device=device)
    keep = min(keep, num)
    if keep >= num:
        return ~kept
    if image_positions is None:
        image_positions = list(range(num))
    if text_positions is None:
        text_positions = list(range(num, num + text_keys.shape[0]))
    n_image = min(image_pivots, keep)
    n_text = min(text_pivots, text_keys.shape[0])
    image_norm = image_keys.float().abs().sum(dim=-1)
    text_norm = text_keys.float().abs().sum(dim=-1)
    pivots_image = image_norm.topk(n_image).indices.tolist() if n_image else []
    pivots_text = text_norm.topk(n_text).indices.tolist() if n_text else []
    kept[pivots_image] = True
    # A pivot is (is_image, index); its position decides the order it is visited in.
    by_position = {image_positions[i]: (True, i) for i in pivots_image}
    by_position.update({text_positions[i]: (False, i) for i in pivots_text})
    # As the release: a set of the image pivots' positions, then the text pivots'.
    visit = set(
        [image_positions[i] for i in pivots_image] + [text_positions[i] for i in pivots_text]
    )
    order = [by_position[p] for p in visit]
    picks = keep - n_image
    share, extra = divmod(picks, max(len(order), 1))
    quota = [share + (1 if j < extra else 0) for j in range(len(order))]
    for (is_image, index), count in zip(order, quota, strict=True):
        if count == 0:
            continue
        pivot = image_states[index] if is_image else text_states[index]
        free = (~kept).nonzero().flatten()  # (R,) unpicked, non-pivot, in position order
        similarity = F.cosine_similarity(pivot[None], image_states[free], dim=-1)
        least = (-similarity).topk(min(count, free.shape[0])).indices
        kept[free[least]] = True
    return kept
