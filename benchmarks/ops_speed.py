"""Speed of the batched PruMerge op against per-token loops, and against the encoder.

Prints, measured side by side in one run with warm-up and interleaved repetitions, at
LLaVA-1.5 shapes (N=576 patches, C=1024) for B=1 and B=16:
  * the batched op vs two loops that compute the same result (``prumerge_loops.py``):
    "released-style loop" loops over rows x kept tokens and rebuilds the other-token tensors
    for every kept token, as the released code does; "loop" is that loop written tightly
    (precomputed tensors, one product per token), the best a loop can do. Each with its max
    difference to the op;
  * the op's time as a fraction of one forward pass of a ViT-L/14-336-shaped CLIP encoder
    (random weights) at B=1.

Usage: python benchmarks/ops_speed.py [--repeats 5] [--threads N] [--json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prumerge.ops import cls_attention, prumerge  # noqa: E402
from prumerge_loops import prumerge_loop, prumerge_released_loop  # noqa: E402


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
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    num_patches, width, heads = 576, 1024, 16  # CLIP ViT-L/14 at 336 px
    loops = {
        "loop": prumerge_loop,
        "released-style loop": prumerge_released_loop,
    }
    report: dict[str, dict[str, float]] = {}

    for batch in (1, 16):
        tokens, keys, attn = encoder_inputs(batch, num_patches, width, heads)
        fast = prumerge(tokens, keys, attn)
        row: dict[str, float] = {"mean_tokens_out": fast.lengths.float().mean().item()}
        # Interleave the candidates round by round, so that load on a shared machine hits
        # them alike; each ratio is the median of the per-round ratios.
        candidates = {"batched": partial(prumerge, tokens, keys, attn)}
        for name, loop in loops.items():
            slow = loop(tokens, keys, attn)
            row[f"{name} max_abs_diff"] = max(
                (a.double() - b.double()).abs().max().item()
                for a, b in zip(fast.unpad(), slow, strict=True)
            )
            candidates[name] = partial(loop, tokens, keys, attn)
        rounds = interleaved(candidates, args.repeats)
        for name, times in rounds.items():
            row[f"{name} ms"] = statistics.median(times) * 1e3
        for name in loops:
            ratios = [s / f for s, f in zip(rounds[name], rounds["batched"], strict=True)]
            row[f"{name} speedup"] = statistics.median(ratios)
            row[f"{name} speedup min"] = min(ratios)
            row[f"{name} speedup max"] = max(ratios)
        report[f"B={batch}"] = row

    encoder_ms, encoder_spread_ms = encoder_forward_ms(args.repeats)
    tokens, keys, attn = encoder_inputs(1, num_patches, width, heads)
    t_op, s_op = timed(partial(prumerge, tokens, keys, attn), args.repeats)
    report["overhead B=1"] = {
        "encoder_ms": encoder_ms,
        "encoder_spread_ms": encoder_spread_ms,
        "op_ms": t_op * 1e3,
        "op_spread_ms": s_op * 1e3,
        "op_fraction_of_encoder": t_op * 1e3 / encoder_ms,
    }

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"PruMerge op, N={num_patches}, C={width}, torch threads={torch.get_num_threads()}, "
        f"medians of {args.repeats} interleaved rounds after warm-up"
    )
    for batch in (1, 16):
        r = report[f"B={batch}"]
        print(
            f"B={batch:<3} batched {r['batched ms']:8.2f} ms/call, {r['mean_tokens_out']:.1f} tokens out per image"
        )
        for name in loops:
            print(
                f"      {name:<20} {r[f'{name} ms']:8.2f} ms/call  speedup {r[f'{name} speedup']:6.1f}x "
                f"[{r[f'{name} speedup min']:.1f}-{r[f'{name} speedup max']:.1f}]  "
                f"max |diff| {r[f'{name} max_abs_diff']:.1e}"
            )
    r = report["overhead B=1"]
    print(
        f"ViT-L/14-336 encoder forward, B=1: {r['encoder_ms']:.1f} ms ±{r['encoder_spread_ms']:.1f}; "
        f"op {r['op_ms']:.2f} ms = {100 * r['op_fraction_of_encoder']:.2f}% of the encoder"
    )


def interleaved(candidates: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one call of each per round."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
