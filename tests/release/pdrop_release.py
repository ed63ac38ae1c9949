"""PyramidDrop as the released code computes it at inference, one prompt at a time.

Transcribed (our own code, written from reading it) from Cooperx521/PyramidDrop at commit
6444f304aee4b7edcb022839fb9e8cd07859704a: ``llava/model/modeling_llama_pdrop.py``,
``LlamaModel.pdrop_forward`` (``rank_layer = layer_idx + 1`` in ``layer_list``, prefill only)
and ``LlamaModel.pdrop_rank_drop`` (the inference branch, right padding); the bookkeeping of
``llava/model/llava_arch.py::prepare_inputs_labels_for_multimodal_pdrop`` (the image's first
position, ``prompt_len``, the image's token count); the schedule of
``scripts/v1_5/pdrop_eval/*.sh`` (``layer_list [8,16,24]``, ``image_token_ratio_list
[0.5,0.25,0.125]`` with 1.0 prepended):

1. After layer ``rank_layer - 1`` runs: ``input_layernorm`` of layer ``rank_layer`` on the
   hidden states, its q/k projections, RoPE at the current (compact) position ids.
2. The query is the last instruction token (``prompt_len + image_tokens - 1``, the prompt's
   last token at inference); logits / sqrt(head_dim) plus the causal mask, softmax in
   float32, the mean over heads, the image span's columns.
3. The top ``int(N * ratio[stage + 1])`` image tokens, in their order, replace the span;
   the position ids are renumbered 0..len-1 and a causal mask is made for the new length.

The release multiplies the query heads with the un-repeated key heads (no grouped-query
attention); the transcription repeats the key heads, which is the same where there are as
many key heads as query heads (Vicuna) and what any grouped-query model needs.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .fastv_release import _causal_mask


def pdrop_release(
    language_model: torch.nn.Module,
    embeds: torch.Tensor,
    *,
    image_start: int,
    image_length: int,
    layer_list: list[int],
    ratios: list[float],
) -> tuple[torch.Tensor, list[int]]:
    """One prompt's final hidden states under PyramidDrop, and the prompt positions that
    reach the last layer.

    Args:
        language_model: the decoder (``.layers``, ``.rotary_emb``, ``.norm``).
        embeds: (L, H) the prompt's input embeddings, the image's N tokens included.
        ratios: ``image_token_ratio_list`` with 1.0 first.
    """
    hidden = embeds[None]
    kept = list(range(embeds.shape[0]))  # the prompt position of every current token
    image_tokens = image_length
    for index, decoder_layer in enumerate(language_model.layers):
        if index in layer_list:
            stage = layer_list.index(index)
            length = hidden.shape[1]
            positions = torch.arange(length)[None]
            attention = language_model.layers[index].self_attn
            x = language_model.layers[index].input_layernorm(hidden)
            d = attention.head_dim
            q = attention.q_proj(x).view(1, length, -1, d).transpose(1, 2)
            k = attention.k_proj(x).view(1, length, -1, d).transpose(1, 2)
            cos, sin = language_model.rotary_emb(x, position_ids=positions)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            query = q[0, :, length - 1 : length]  # (heads, 1, d): the last instruction token
            logits = query @ k[0].transpose(1, 2) / math.sqrt(d)
            logits = logits + _causal_mask(length, logits.dtype)[0, :, length - 1 : length]
            weights = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            scores = weights.mean(dim=0)[:, image_start : image_start + image_tokens].mean(dim=0)
            keep_length = int(image_length * ratios[stage + 1])
            top = scores.topk(keep_length).indices.sort().values + image_start
            order = (
                list(range(image_start))
                + top.tolist()
                + list(range(image_start + image_tokens, length))
            )
            hidden = hidden[:, order]
            kept = [kept[i] for i in order]
            image_tokens = keep_length
        length = hidden.shape[1]
        positions = torch.arange(length)[None]
        rotary = language_model.rotary_emb(hidden, position_ids=positions)
        hidden = decoder_layer(
            hidden,
            attention_mask=_causal_mask(length, hidden.dtype),
            position_ids=positions,
            position_embeddings=rotary,
        )
    return language_model.norm(hidden)[0], kept
