"""DART as the released code computes it, one prompt at a time.

Transcribed (our own code, written from reading it) from the DART release as carried by the
fork xqy1111111/DART at commit 5a19452fc173017191c247848673e0bde755695a (the last upstream
commit of ZichenWen1/DART it carries): ``llava/model/language_model/modeling_llama_self.py``,
``DART.forward`` (the branch ``decoder_layer.self_attn.layer_idx == K and seq_length > 1``)
and ``DART.get_retained_image_token``; the defaults from ``llava/eval/model_vqa_loader.py``
(``configure_DART``) and ``scripts/v1_5/eval/*.sh``:

1. Layers 0 .. K-1 run on the whole sequence.
2. Before layer K: ``last_layer_state`` = the final norm of layer K-1's output; the keys of
   layer K-1 after RoPE (grouped heads repeated, as its sdpa path returns them), heads side
   by side.
3. Pivots: the 4 image tokens and the 4 text tokens (everything after the image) with the
   largest L1 key norm; ``TOKEN_TOPK = ceil(max_num_trunction // 8)``.
4. For each pivot, in the iteration order of ``set(image_pivots + text_pivots)``: the
   TOKEN_TOPK remaining non-pivot image tokens with the largest NEGATIVE cosine similarity
   (on ``last_layer_state``) join the kept set and leave the remaining ones.
5. The text pivots are removed from the set; ``keep_indexs`` = system prompt + kept image
   tokens + all text, sorted; ``position_ids = keep_indexs``; the mask is cut to the length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .fastv_release import _causal_mask


def dart_retained(
    keys: torch.Tensor,
    states: torch.Tensor,
    *,
    image_start: int,
    image_length: int,
    max_num_trunction: int,
    pivot_image_token: int = 4,
    pivot_text_token: int = 4,
) -> list[int]:
    """``get_retained_image_token``: the kept image positions (as the release returns them).

    Args:
        keys: (L, C) layer K-1's post-RoPE keys of the prompt, heads side by side.
        states: (L, H) layer K-1's output through the final norm.
    """
    topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    image_keys = keys[image_start : image_start + image_length]
    text_keys = keys[image_start + image_length :]
    image_pivots = (
        torch.norm(image_keys, p=1, dim=-1).topk(pivot_image_token).indices + image_start
    ).tolist()
    text_pivots = (
        torch.norm(text_keys, p=1, dim=-1).topk(pivot_text_token).indices
        + image_start
        + image_length
    ).tolist()
    chosen = set(image_pivots + text_pivots)
    remaining = set(range(image_start, image_start + image_length)) - set(image_pivots)
    remaining_list = list(remaining)
    for pivot in list(chosen):
        similarity = -F.cosine_similarity(states[pivot], states[remaining_list], dim=-1)
        picked = [remaining_list[i] for i in similarity.topk(topk).indices]
        chosen.update(picked)
        remaining.difference_update(picked)
        remaining_list = list(remaining)
    chosen.difference_update(text_pivots)
    return list(chosen)


def dart_release(
    language_model: torch.nn.Module,
    embeds: torch.Tensor,
    *,
    image_start: int,
    image_length: int,
    max_num_trunction: int,
    layer: int = 2,
) -> tuple[torch.Tensor, list[int]]:
    """One prompt's final hidden states under DART, and the positions kept from layer K.

    Args:
        language_model: the decoder (``.layers``, ``.rotary_emb``, ``.norm``).
        embeds: (L, H) the prompt's input embeddings, the image's tokens included.
    """
    length = embeds.shape[0]
    hidden = embeds[None]
    positions = torch.arange(length)[None]
    mask = _causal_mask(length, hidden.dtype)
    captured = {}
    attention = language_model.layers[layer - 1].self_attn

    def capture(_module, _args, kwargs):
        captured["input"] = kwargs["hidden_states"]
        captured["rotary"] = kwargs["position_embeddings"]

    hook = attention.register_forward_pre_hook(capture, with_kwargs=True)
    kept = list(range(length))
    try:
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                x = captured["input"]
                key = attention.k_proj(x).view(1, length, -1, attention.head_dim).transpose(1, 2)
                cos, sin = captured["rotary"]
                _, key = apply_rotary_pos_emb(key, key, cos, sin)
                groups = attention.config.num_attention_heads // key.shape[1]
                key = key.repeat_interleave(groups, dim=1)  # repeat_kv
                keys = key.permute(0, 2, 1, 3).reshape(length, -1)
                states = language_model.norm(hidden)[0]
                retained = dart_retained(
                    keys,
                    states,
                    image_start=image_start,
                    image_length=image_length,
                    max_num_trunction=max_num_trunction,
                )
                kept = sorted(
                    list(range(image_start))
                    + retained
                    + list(range(image_start + image_length, length))
                )
                hidden = hidden[:, kept]
                positions = torch.tensor(kept)[None]
                mask = _causal_mask(len(kept), hidden.dtype)
            rotary = language_model.rotary_emb(hidden, position_ids=positions)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary
            )
    finally:
        hook.remove()
    return language_model.norm(hidden)[0], kept
