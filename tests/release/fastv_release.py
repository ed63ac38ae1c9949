"""FastV as the released code computes it (its in-place token-drop path), one prompt at a time.

Transcribed (our own code, written from reading it) from pkunlp-icler/FastV at commit
d1659729b5bf1be225e99ee15783deeea80f63b1:
``src/transformers/src/transformers/models/llama/modeling_llama.py``, ``LlamaModel.forward``,
the branch ``USE_FAST_V and FASTV_INPLACE``:

1. Layers 0 .. K-1 run on the whole sequence.
2. Before layer K (``idx == AGG_LAYER``): layer K-1's attention weights
   (``layer_outputs[1]``), averaged over heads, of batch row 0, query row -1 (the last
   token); the image span ``[SYS_LENGTH, SYS_LENGTH + IMAGE_TOKEN_LENGTH)``; its
   ``topk(ATTENTION_RANK)``.
3. ``keep_indexs`` = every token before the image, the top image tokens, every token after
   it, sorted; the hidden states are indexed by it, ``position_ids = keep_indexs`` (the
   original positions) and a new causal mask is made for the shorter length.
4. Layers K .. end run on the shorter sequence; then the final norm.

The decoder layers are called as modules (they are the model, not FastV); the rotary
embeddings, the causal mask and the selection are written out here.
"""

from __future__ import annotations

import torch


def _causal_mask(length: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]  # (1, 1, L, L), added to the attention logits


def fastv_release(
    language_model: torch.nn.Module,
    embeds: torch.Tensor,
    *,
    image_start: int,
    image_length: int,
    keep: int,
    layer: int,
) -> tuple[torch.Tensor, list[int]]:
    """One prompt's final hidden states under FastV, and the positions kept from layer K.

    Args:
        language_model: the decoder (``.layers``, ``.rotary_emb``, ``.norm``) with eager
            attention, so that its attention modules return their weights.
        embeds: (L, H) the prompt's input embeddings, the image's N tokens included.
        image_start: SYS_LENGTH, the image's first position.
        image_length: IMAGE_TOKEN_LENGTH, N.
        keep: ATTENTION_RANK, image tokens kept.
        layer: AGG_LAYER, K.

    Returns:
        The (L', H) normed hidden states of the kept positions and those positions.
    """
    length = embeds.shape[0]
    hidden = embeds[None]
    positions = torch.arange(length)[None]
    mask = _causal_mask(length, hidden.dtype)
    captured = {}
    attention = language_model.layers[layer - 1].self_attn
    hook = attention.register_forward_hook(lambda _m, _i, out: captured.update(weights=out[1]))
    try:
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                weights = captured["weights"][0].mean(dim=0)  # (L, L) averaged over heads
                scores = weights[-1, image_start : image_start + image_length].tolist()
                top = sorted(range(image_length), key=lambda j: (-scores[j], j))[:keep]
                kept = sorted(
                    list(range(image_start))
                    + [image_start + j for j in top]
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
