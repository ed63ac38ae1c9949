"""Speed of the batched PruMerge op against a per-token loop, and against the encoder.

Prints, measured side by side in one run with warm-up and repetitions:
  * the batched op vs the loop reference (the released code's rows x tokens loop structure)
    at LLaVA-1.5 shapes, N=576 patches, C=1024, for B=1 and B=16, and their max difference;
  * the op's time as a fraction of one forward pass of a ViT-L/14-336-shaped CLIP encoder
    (random weights) at B=1.

Usage: python benchmarks/ops_speed.py [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.ops.reference import prumerge_loop  # noqa: E402

from prumerge.ops import cls_attention, prumerge  # noqa: E402


def timed(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (max(times) - min(times)) / 2


def encoder_inputs(batch: int, num_patches: int, width: int, heads: int, seed: int = 0):
    """Patch features, keys and a peaked [CLS] attention, like a real CLIP layer's."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_patches + 1, width, generator=gen)
    k = torch.randn(batch, num_patches + 1, width, generator=gen)
    # A few patches per image attract the [CLS] query, as in trained encoders.
    hot = torch.randint(0, num_patches, (batch, 24), generator=gen) + 1
    k.scatter_add_(1, hot[..., None].expand(-1, -1, width), q[:, :1].expand(-1, 24, -1) * 0.5)
    tokens = torch.randn(batch, num_patches, width, generator=gen)
    attn = cls_attention(q, k, num_heads=heads)
    return tokens, k[:, 1:], attn


def encoder_forward_ms(repeats: int) -> tuple[float, float]:
    """Median and half-spread (ms) of a ViT-L/14-336-shaped CLIP encoder forward at B=1.

    Random weights: only the shapes matter for the time.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    encoder = CLIPVisionModel(config).eval()
    pixels = torch.randn(1, 3, 336, 336)
    with torch.inference_mode():
        median, spread = timed(partial(encoder, pixel_values=pixels), repeats, warmup=1)
    return median * 1e3, spread * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    num_patches, width, heads = 576, 1024, 16  # CLIP ViT-L/14 at 336 px
    report: dict[str, dict[str, float]] = {}

    for batch in (1, 16):
        tokens, keys, attn = encoder_inputs(batch, num_patches, width, heads)
        fast = prumerge(tokens, keys, attn)
        slow = prumerge_loop(tokens, keys, attn)
        diff = max((a - b).abs().max().item() for a, b in zip(fast.unpad(), slow, strict=True))
        t_fast, s_fast = timed(partial(prumerge, tokens, keys, attn), args.repeats)
        t_slow, s_slow = timed(partial(prumerge_loop, tokens, keys, attn), args.repeats)
        report[f"B={batch}"] = {
            "batched_ms": t_fast * 1e3,
            "batched_spread_ms": s_fast * 1e3,
            "loop_ms": t_slow * 1e3,
            "loop_spread_ms": s_slow * 1e3,
            "speedup": t_slow / t_fast,
            "max_abs_diff": diff,
            "mean_tokens_out": fast.lengths.float().mean().item(),
        }

    encoder_ms, encoder_spread_ms = encoder_forward_ms(args.repeats)
    tokens, keys, attn = encoder_inputs(1, num_patches, width, heads)
    t_op, s_op = timed(partial(prumerge, tokens, keys, attn), args.repeats)
    t_enc, s_enc = encoder_ms / 1e3, encoder_spread_ms / 1e3
    report["overhead B=1"] = {
        "encoder_ms": t_enc * 1e3,
        "encoder_spread_ms": s_enc * 1e3,
        "op_ms": t_op * 1e3,
        "op_spread_ms": s_op * 1e3,
        "op_fraction_of_encoder": t_op / t_enc,
    }

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"PruMerge op, N={num_patches}, C={width}, torch threads={torch.get_num_threads()}")
    print(
        f"{'batch':>6} {'batched ms':>12} {'loop ms':>12} {'speedup':>8} {'max |diff|':>11} {'tokens':>7}"
    )
    for batch in (1, 16):
        r = report[f"B={batch}"]
        print(
            f"{batch:>6} {r['batched_ms']:>8.2f} ±{r['batched_spread_ms']:<3.1f}"
            f"{r['loop_ms']:>8.1f} ±{r['loop_spread_ms']:<3.0f}{r['speedup']:>7.1f}x"
            f"{r['max_abs_diff']:>11.1e}{r['mean_tokens_out']:>8.1f}"
        )
    r = report["overhead B=1"]
    print(
        f"ViT-L/14-336 encoder forward, B=1: {r['encoder_ms']:.1f} ms ±{r['encoder_spread_ms']:.1f}; "
        f"op {r['op_ms']:.2f} ms = {100 * r['op_fraction_of_encoder']:.2f}% of the encoder"
    )


if __name__ == "__main__":
    main()
