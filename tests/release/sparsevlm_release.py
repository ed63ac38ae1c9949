"""SparseVLM / SparseVLM+ as the released code computes them at inference, one prompt at a
time, with SparseVLM v1's recycling of dropped tokens or without it.

Transcribed (our own code, written from reading it) from Gumpest/SparseVLMs at commit
26a5f48813c46cd1c7364160354e7fdd3febaa67 (code last changed in 9e1f649):
``llava/model/language_model/modelling_sparse_llama.py``, ``LlamaDynamicvitModel.forward``
(``pruning_loc = [2, 6, 15]``, the inference branch) and the softmax map its sdpa attention
returns; ``llava/model/language_model/score.py`` (``attn_postprocess_topk``,
``select_attn_head_by_sum``, the keep tables):

1. Text raters, once, from the input embeddings: m = softmax over the text (everything after
   the image) of v @ t^T, averaged over the visual tokens; raters = the text with m > mean(m).
2. At a pruning layer the layer runs on every current token; its softmax attention (causal,
   q k^T / sqrt(d)) is taken for every head.
3. SparseVLM+ (``USE_VERSION=2_0``): the map is divided by the logits of all-ones q and k
   rotated at the current positions, and only the 14 heads with the largest rater-to-visual
   sum are kept.
4. The mean over heads, the rater rows and the visual columns, the mean over raters; the top
   min(k, v - 1) visual tokens stay; the layer's OUTPUT is indexed by the kept tokens; v2
   keeps their position ids, v1 truncates the position ids to the new length.
5. v1 recycling (the ``s_flag`` branch; ``llava/model/language_model/utils.py``,
   ``cluster_and_merge``): of the dropped visual tokens (in order), the top int(0.3 d) + 1 by
   their score, from the layer's OUTPUT, are clustered into int(r / 10) + 1 clusters by
   density peaks: distances ||x_i - x_j|| / sqrt(C), density exp(-mean of the squared
   distances to the k = clusters nearest), each token's distance to the nearest denser one
   (the largest distance for the densest), centres = the top k of distance x density, every
   token to its nearest centre (centres to themselves), each cluster Σ x / (n + 1e-6); they
   go right after the kept visual tokens, the position ids truncated to the new length, and
   count as visual tokens for the next layer. (The release adds random noise below 1e-6 to
   the densities, so that no two are equal; this transcription, as prumerge, breaks the ties
   of equal densities and of equal scores towards the lower index instead.)
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .fastv_release import _causal_mask


def sparsevlm_release(
    language_model: torch.nn.Module,
    embeds: torch.Tensor,
    *,
    image_start: int,
    image_length: int,
    pruning_loc: list[int],
    counts: list[int],
    version: str = "v2",
    heads: int = 14,
    recycle: bool = False,
) -> tuple[torch.Tensor, list[int | None]]:
    """One prompt's final hidden states and the prompt positions that reach the last layer
    (None for a recycled cluster token). ``counts``: the tokens kept by rank."""
    hidden = embeds[None]
    length = embeds.shape[0]
    kept: list[int | None] = list(range(length))
    positions = torch.arange(length)[None]
    text_start = image_start + image_length
    v = embeds[image_start:text_start]
    t = embeds[text_start:]
    relevance = (v @ t.T).softmax(dim=1).mean(dim=0)
    raters = torch.where(relevance > relevance.mean())[0]
    image_count = image_length
    captured: dict[str, torch.Tensor] = {}
    for index, decoder_layer in enumerate(language_model.layers):
        current = hidden.shape[1]
        rotary = language_model.rotary_emb(hidden, position_ids=positions)
        captured.clear()
        attention = decoder_layer.self_attn
        hook = attention.register_forward_pre_hook(
            lambda _m, _a, kw: captured.update(x=kw["hidden_states"]), with_kwargs=True
        )
        try:
            output = decoder_layer(
                hidden,
                attention_mask=_causal_mask(current, hidden.dtype),
                position_ids=positions,
                position_embeddings=rotary,
            )
        finally:
            hook.remove()
        if index in pruning_loc:
            x = captured["x"]
            d = attention.head_dim
            q = attention.q_proj(x).view(1, current, -1, d).transpose(1, 2)
            k = attention.k_proj(x).view(1, current, -1, d).transpose(1, 2)
            cos, sin = rotary
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = q @ k.transpose(2, 3) * (1 / d**0.5) + _causal_mask(current, q.dtype)[0]
            maps = logits.softmax(dim=-1)  # (1, heads, L, L)
            text_now = image_start + image_count
            rows = raters + text_now
            if version == "v2":
                ones = torch.ones(1, q.shape[1], current, d)
                q1, k1 = apply_rotary_pos_emb(ones, ones, cos, sin)
                maps = maps / (q1 @ k1.transpose(2, 3) / d**0.5)
                per_head = maps[0][:, rows, image_start:text_now].sum((1, 2))
                maps = maps[:, per_head.topk(heads).indices]
            relation = maps.mean(1)[:, rows, image_start:text_now].mean(1)[0]  # (v,)
            top = relation.topk(min(counts[pruning_loc.index(index)], image_count - 1)).indices
            keep_image = sorted((top + image_start).tolist())
            merged = output[:, :0]
            if recycle:
                dropped = [i for i in range(image_count) if i + image_start not in keep_image]
                recycled = int(len(dropped) * 0.3) + 1
                by_score = relation[dropped].topk(recycled).indices.tolist()
                members = [dropped[j] + image_start for j in by_score]
                merged = _cluster_and_merge(output[0, members], int(recycled / 10) + 1)[None]
            head = list(range(image_start)) + keep_image
            tail = list(range(text_now, current))
            output = torch.cat([output[:, head], merged, output[:, tail]], dim=1)
            kept = [kept[i] for i in head] + [None] * merged.shape[1] + [kept[i] for i in tail]
            order = head + tail
            positions = positions[:, order] if version == "v2" else positions[:, : output.shape[1]]
            image_count = len(keep_image) + merged.shape[1]
        hidden = output
    return language_model.norm(hidden)[0], kept


def _cluster_and_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """(clusters, C) the cluster means of the (M, C) tokens, as ``cluster_and_merge``."""
    count, width = x.shape
    d = torch.tensor(
        [
            [float((x[i].double() - x[j].double()).norm()) / width**0.5 for j in range(count)]
            for i in range(count)
        ],
        dtype=torch.float64,
    )
    density = [
        math.exp(-sum(v * v for v in sorted(d[i].tolist())[:clusters]) / clusters)
        for i in range(count)
    ]
    largest = float(d.max())
    parent = []
    for i in range(count):
        denser = [
            float(d[i, j])
            for j in range(count)
            if density[j] > density[i] or (density[j] == density[i] and j < i)
        ]
        parent.append(min(denser) if denser else largest)
    score = [p * q for p, q in zip(parent, density, strict=True)]
    centres = sorted(range(count), key=lambda i: -score[i])[:clusters]
    owner = []
    for i in range(count):
        distances = [float(d[c, i]) for c in centres]
        owner.append(distances.index(min(distances)))
    for number, centre in enumerate(centres):
        owner[centre] = number
    merged = torch.zeros(clusters, width, dtype=x.dtype)
    for number in range(clusters):
        members = [i for i in range(count) if owner[i] == number]
        for i in members:
            merged[number] += x[i] * (1.0 / (len(members) + 1e-6))
    return merged
