"""Attention of the [CLS] query over the patch keys of one vision-encoder layer."""

from __future__ import annotations

from typing import Literal

import torch

AttentionMode = Literal["multihead", "reference"]


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError if ``tensor`` holds NaN or inf.

    One float32 sum is the fast path (NaN and inf propagate into it); only when the sum is
    not finite, which a huge finite tensor can also cause, is every element checked.
    """
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values")


def cls_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_heads: int,
    num_prefix_tokens: int = 1,
    mode: AttentionMode = "multihead",
) -> torch.Tensor:
    """Attention paid by the [CLS] query to every patch key.

    The softmax runs over all keys, prefix tokens included (as the encoder itself does), and
    the prefix columns are dropped afterwards, so a row does not sum to one.

    Args:
        q: (B, T, C) query projections of the layer, T = num_prefix_tokens + N.
        k: (B, T, C) key projections of the same layer.
        num_heads: attention heads of the layer; C must be divisible by it.
        num_prefix_tokens: leading non-patch tokens ([CLS] first, then registers, if any).
        mode: ``"multihead"`` (default) splits C into heads, applies softmax per head with
            scale head_dim^-0.5 and averages the heads, which is the attention the encoder
            really computes. ``"reference"`` reproduces the released PruMerge code: one head
            over the full width with scale C^-0.5. Use it only to reproduce that code's numbers.

    Returns:
        (B, N) float32 attention of the [CLS] query over the N patch keys.
    """
    if q.ndim != 3 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be (B, T, C); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    batch, length, width = q.shape
    if num_prefix_tokens < 1 or num_prefix_tokens >= length:
        raise ValueError(
            f"num_prefix_tokens must be in [1, T-1] with the [CLS] token first; got "
            f"{num_prefix_tokens} for T={length}"
        )
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
    check_finite("q", q)
    check_finite("k", k)
    q = q.float()
    k = k.float()
    if mode == "multihead":
        head_dim = width // num_heads
        q_cls = q[:, 0].reshape(batch, num_heads, 1, head_dim)  # (B, h, 1, D)
        keys = k.reshape(batch, length, num_heads, head_dim).transpose(1, 2)  # (B, h, T, D)
        logits = (q_cls @ keys.transpose(-1, -2)).squeeze(2) * head_dim**-0.5  # (B, h, T)
        attn = logits.softmax(dim=-1).mean(dim=1)  # (B, T)
    elif mode == "reference":
        logits = torch.einsum("bc,btc->bt", q[:, 0], k) * width**-0.5  # (B, T)
        attn = logits.softmax(dim=-1)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; expected 'multihead' or 'reference'")
    return attn[:, num_prefix_tokens:]


def mean_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_heads: int,
    num_prefix_tokens: int = 0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean attention each patch receives: the [CLS]-free importance signal.

    For towers without a [CLS] token (SigLIP, Qwen2-VL's ViT) the usual stand-in for [CLS]
    attention is the attention a patch receives from every query of a layer, averaged over
    the heads and the queries (HoliTom and EffiVLM-Bench port VisionZip and PruMerge+ to
    LLaVA-OneVision and Qwen2-VL this way). Softmax runs per head over all keys, with scale
    head_dim^-0.5, as the encoder computes it; prefix keys take part in the softmax and are
    dropped afterwards, and every query, prefix tokens included, counts in the mean.

    Heads are processed one at a time so that memory stays at one (B, T, T) map.

    Args:
        q: (B, T, C) query projections of the layer (rotary embeddings already applied, for
            towers that rotate them).
        k: (B, T, C) key projections of the same layer.
        num_heads: attention heads; C must be divisible by it.
        num_prefix_tokens: leading non-patch tokens ([CLS], registers); 0 for none.
        valid: (B, T) bool, False at padding of ragged batches (neither key nor query);
            None when every token is real.

    Returns:
        (B, T - num_prefix_tokens) float32 mean attention received by each token after the
        prefix; 0 at padding.
    """
    if q.ndim != 3 or q.shape != k.shape:
        raise ValueError(
            f"q and k must both be (B, T, C); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    batch, length, width = q.shape
    if not 0 <= num_prefix_tokens < length:
        raise ValueError(
            f"num_prefix_tokens must be in [0, T-1]; got {num_prefix_tokens} for T={length}"
        )
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
    if valid is not None and valid.shape != (batch, length):
        raise ValueError(f"valid must be (B, T) = ({batch}, {length}); got {tuple(valid.shape)}")
    check_finite("q", q)
    check_finite("k", k)
    head_dim = width // num_heads
    queries = q.float().reshape(batch, length, num_heads, head_dim)
    keys = k.float().reshape(batch, length, num_heads, head_dim)
    received = torch.zeros(batch, length, dtype=torch.float32, device=q.device)
    blocked = None if valid is None else ~valid[:, None, :]  # (B, 1, T) keys
    for head in range(num_heads):
        logits = queries[:, :, head] @ keys[:, :, head].transpose(1, 2) * head_dim**-0.5
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        attn = logits.softmax(dim=-1)  # (B, T queries, T keys)
        if valid is not None:
            attn = attn * valid[:, :, None]  # padding queries do not count
        received += attn.sum(dim=1)
    queries_per_row = (
        torch.full((batch, 1), float(length), device=q.device)
        if valid is None
        else valid.sum(dim=1, keepdim=True).float().clamp_min(1.0)
    )
    return (received / (num_heads * queries_per_row))[:, num_prefix_tokens:]


def key_head_mean(keys: torch.Tensor, num_heads: int | None) -> torch.Tensor:
    """Keys averaged over the attention heads: the similarity metric of ToMe (``k.mean(1)``)
    and VisionZip (``raw_key_states.mean(1)``).

    Args:
        keys: (B, N, C) key projections, C = num_heads * head_dim (heads side by side, as a
            linear k projection lays them out).
        num_heads: heads the width splits into; None or 1 returns the keys unchanged.

    Returns:
        (B, N, C / num_heads) mean over the heads of every token's key.
    """
    if num_heads is None or num_heads == 1:
        return keys
    batch, num, width = keys.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"key width {width} is not divisible by num_heads={num_heads}")
    return keys.reshape(batch, num, num_heads, width // num_heads).mean(dim=2)
