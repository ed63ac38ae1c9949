"""ToMe as the released code computes it: one bipartite matching, the size-weighted merge,
and a CLIP vision tower run as ToMe's patched ViT, one image at a time.

Transcribed (our own code, written from reading it) from facebookresearch/ToMe at commit
af95e4b1befa172dadccd8c81e223b10090f9579: ``tome/merge.py`` (``bipartite_soft_matching``
with ``class_token``, ``merge_wavg``) and ``tome/patch/timm.py`` (``ToMeBlock.forward``:
attention on norm1(x) with proportional attention, residual, merge r tokens by the metric
``k.mean(1)`` of that attention, then the MLP on the merged tokens; ``ToMeAttention``: log
of the key sizes added to the logits; ``apply_patch``: ``prop_attn=True``, ``class_token``
when the model has a cls token).

1. Tokens at even positions are set A, at odd positions set B; metric normalised; scores =
   A @ B^T; with a class token, A's first row (the class token) is -inf.
2. Every A token's best B match (max, argmax); A sorted by that score, descending; the
   first r merge (src), the rest stay (unm); with a class token unm is sorted by position.
3. merge: [x of unm A tokens, x of B tokens with their sources added].
4. merge_wavg: x = merge(x * size) / merge(size), size = merge(size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bipartite_release(
    metric: torch.Tensor, r: int, *, class_token: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """One matching of t tokens.

    Args:
        metric: (t, d) per-token metric.
        r: tokens to merge away.
        class_token: protect token 0.

    Returns:
        The unmerged A tokens (token positions, in output order) and (source, destination)
        token-position pairs; the output is [unmerged..., every B token in order].
    """
    t = metric.shape[0]
    protected = 1 if class_token else 0
    r = min(r, (t - protected) // 2)
    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    a_tokens, b_tokens = list(range(0, t, 2)), list(range(1, t, 2))
    best = []
    for row, a in enumerate(a_tokens):
        scores = (unit[b_tokens] @ unit[a]).tolist()  # cosine to every B token
        if class_token and row == 0:
            scores = [-math.inf] * len(b_tokens)
        top = max(scores)
        best.append((top, scores.index(top)))
    order = sorted(range(len(a_tokens)), key=lambda row: (-best[row][0], row))
    sources, unmerged = order[:r], order[r:]
    if class_token:
        unmerged = sorted(unmerged)
    pairs = [(a_tokens[row], b_tokens[best[row][1]]) for row in sources]
    return [a_tokens[row] for row in unmerged], pairs


def merge_wavg_release(
    x: torch.Tensor,
    size: torch.Tensor,
    unmerged: list[int],
    pairs: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_wavg`` of (t, C) tokens with (t,) sizes: the merged tokens and sizes."""
    t = x.shape[0]
    weighted = {j: x[j] * size[j] for j in range(t)}
    sizes = {j: size[j].clone() for j in range(t)}
    for source, destination in pairs:
        weighted[destination] = weighted[destination] + weighted[source]
        sizes[destination] = sizes[destination] + sizes[source]
    order = unmerged + list(range(1, t, 2))
    new_size = torch.stack([sizes[j] for j in order])
    return torch.stack([weighted[j] for j in order]) / new_size[:, None], new_size


def clip_tower_with_tome(
    tower: torch.nn.Module, pixels: torch.Tensor, schedule: list[int]
) -> tuple[torch.Tensor, list[list[int]]]:
    """One image through a Hugging Face ``CLIPVisionModel`` as ToMe's patched ViT would run
    it, for ``len(schedule)`` encoder layers (the layers before the selected features).

    Only the embeddings module is the tower's own; every layer is written out from its
    weights (pre-norm attention, quick-GELU or GELU MLP as configured).

    Args:
        tower: the vision tower.
        pixels: (1, 3, H, W) one image.
        schedule: r of every layer run.

    Returns:
        The (1 + K, C) float64 tokens after the last layer run ([CLS] first) and, for each
        of the K merged tokens, the sorted patch indices it holds.
    """
    vision = getattr(tower, "vision_model", tower)  # transformers 5 has no vision_model
    config = tower.config
    heads = config.num_attention_heads
    x = vision.pre_layrnorm(vision.embeddings(pixels))[0].double()  # (T, C)
    size = torch.ones(x.shape[0], dtype=torch.float64)
    sources = [[j - 1] for j in range(x.shape[0])]  # patch ids; [CLS] holds "patch -1"
    act = {"quick_gelu": lambda v: v * torch.sigmoid(1.702 * v), "gelu": F.gelu}[config.hidden_act]
    for index, r in enumerate(schedule):
        layer = vision.encoder.layers[index]
        attn = layer.self_attn

        def linear(module, v):
            return v @ module.weight.double().T + module.bias.double()

        def norm(module, v):
            return F.layer_norm(
                v, v.shape[-1:], module.weight.double(), module.bias.double(), module.eps
            )

        h = norm(layer.layer_norm1, x)
        t, width = h.shape
        q = linear(attn.q_proj, h).view(t, heads, -1).transpose(0, 1)  # (heads, t, d)
        k = linear(attn.k_proj, h).view(t, heads, -1).transpose(0, 1)
        v = linear(attn.v_proj, h).view(t, heads, -1).transpose(0, 1)
        logits = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5 + size.log()[None, None, :]
        mixed = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(t, width)
        x = x + linear(attn.out_proj, mixed)
        if r > 0:
            unmerged, pairs = bipartite_release(k.mean(dim=0), r, class_token=True)
            x, size = merge_wavg_release(x, size, unmerged, pairs)
            held = {j: list(sources[j]) for j in range(t)}
            for source, destination in pairs:
                held[destination] += held[source]
            sources = [held[j] for j in unmerged + list(range(1, t, 2))]
        h = norm(layer.layer_norm2, x)
        x = x + linear(layer.mlp.fc2, act(linear(layer.mlp.fc1, h)))
    return x, [sorted(group) for group in sources[1:]]
