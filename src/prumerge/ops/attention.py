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
