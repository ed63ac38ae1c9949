"""Seeded uniform random sampling of patches: the floor every reduction method must beat."""

from __future__ import annotations

from functools import lru_cache

import torch

from prumerge.ops.keep import full_reduction, kept_reduction, validate_inputs
from prumerge.ops.reduction import Reduction
from prumerge.ops.select import budget_count

_MASK32 = 0xFFFFFFFF
# Channels of every patch that go into a row's content key. The key only has to tell images
# apart, not resist attacks, and a fixed width keeps its cost independent of C.
_KEY_CHANNELS = 32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 values in [0, 2^32).

    The multiplier is below 2^31, so no product leaves int64 and the arithmetic is exact on
    every device: the same inputs give the same bits on CPU and GPU.
    """
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x045D9F3B) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(value: int) -> int:
    """``_mix32`` of one Python int in [0, 2^32)."""
    for _ in range(2):
        value ^= value >> 16
        value = (value * 0x045D9F3B) & _MASK32
    return value ^ (value >> 16)


@lru_cache(maxsize=16)
def _position_weights(length: int, device: str) -> torch.Tensor:
    # (length,) odd weights in [1, 2^31): multiplying by an odd number is a bijection modulo
    # 2^32, so changing any single element of a row always changes its key.
    weights = (_mix32(torch.arange(length, dtype=torch.long)) & 0x7FFFFFFF) | 1
    return weights.to(device)


def row_keys(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) int64 key in [0, 2^32) of each row's content, exact and batch-independent.

    It hashes the bit patterns (as float32) of the first ``_KEY_CHANNELS`` channels of every
    patch with integer arithmetic, so a row gets the same key alone or in any batch, on any
    device.

    Args:
        tokens: (B, N, C) patch features.
    """
    batch = tokens.shape[0]
    head = tokens[..., :_KEY_CHANNELS].float().contiguous()  # (B, N, c)
    bits = head.view(torch.int32).reshape(batch, -1).long() & _MASK32  # (B, N*c)
    weights = _position_weights(bits.shape[1], str(tokens.device))
    # Products stay below 2^63 and the sum of N*c terms below 2^32 each cannot overflow.
    total = ((bits * weights) & _MASK32).sum(dim=1)
    return _mix32((total ^ (total >> 32)) & _MASK32)


def random_scores(tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, N) int64 pseudo-random scores in [0, 2^32), a function of (seed, row content, patch).

    A counter-based stream: the score of patch j in row b hashes the seed, row b's content key
    and j, so each row draws independently of the others and of its place in the batch, and
    the draw is reproducible on any device.
    """
    batch, num, _ = tokens.shape
    seed_key = _mix32_int(seed)
    stream = _mix32(row_keys(tokens) ^ seed_key)  # (B,)
    # Golden-ratio increments (as in SplitMix) spread consecutive patch indices apart.
    counter = torch.arange(num, device=tokens.device) * 0x9E3779B1
    return _mix32((stream[:, None] + counter[None, :]) & _MASK32)


def random_sample(tokens: torch.Tensor, *, keep: int | float = 64, seed: int = 0) -> Reduction:
    """Keep a uniformly random subset of ``keep`` patches per image, in raster order.

    The honest floor for every other method: it uses neither attention nor features to choose.
    Each row draws from its own stream, keyed by ``seed`` and the row's content (see
    ``random_scores``), so a row's sample does not depend on the rest of the batch, repeats
    exactly for the same seed and image, and differs between images and between seeds. Each
    dropped patch is assigned to the most feature-similar kept one (cosine).

    Args:
        tokens: (B, N, C) patch features.
        keep: output tokens per image, an int count or a float ratio of N.
        seed: integer in [0, 2^32).

    Returns:
        A ``Reduction`` with ``keep`` tokens per row (all N, unchanged, if keep >= N).
    """
    validate_inputs(tokens)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MASK32:
        raise ValueError(f"seed must be an int in [0, 2^32); got {seed!r}")
    batch, num, _ = tokens.shape
    budget = budget_count(keep, num)
    if budget >= num:
        return full_reduction(tokens)
    scores = random_scores(tokens, seed)
    # Ties (two equal 32-bit scores) go to the lower patch index.
    order = torch.argsort(scores, dim=1, stable=True)
    selected = torch.zeros(batch, num, dtype=torch.bool, device=tokens.device)
    selected.scatter_(1, order[:, :budget], True)
    return kept_reduction(tokens, selected, tokens)
