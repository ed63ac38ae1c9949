"""Vision-side overhead of every registered reduction method, against the vision encoder.

Prints, measured side by side in one run with warm-up and repetitions (medians), at
LLaVA-1.5 shapes (N=576 patches, C=1024, keys of width 1024, peaked [CLS] attention):
  * each method's time per image at B=1 and at B=16 (the B=16 time divided by 16);
  * that B=1 time as a fraction of one forward pass of a ViT-L/14-336-shaped CLIP encoder
    (random weights) at B=1, measured in the same run.
The encoder's own cost of exposing keys and attention is not counted here.

Usage: python benchmarks/methods_overhead.py [--keep 64] [--repeats 9] [--encoder-repeats 3]
       [--threads T] [--json]
On a machine shared with other jobs, --threads 1 gives far steadier medians: a parallel op
waits for its slowest thread, and any descheduled thread stalls it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops_speed import encoder_forward_ms, encoder_inputs, timed  # noqa: E402
from prumerge.methods import METHODS, VisionInputs, build_method, method_names  # noqa: E402

NUM_PATCHES, WIDTH, HEADS = 576, 1024, 16  # CLIP ViT-L/14 at 336 px


def build(name: str, keep: int) -> object:
    params = inspect.signature(METHODS[name].__init__).parameters
    # PruMerge keeps its adaptive (IQR) default: that is the method users run.
    if "keep" in params and name not in ("prumerge", "prumerge+"):
        return build_method(name, keep=keep)
    return build_method(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, default=64, help="budget of the fixed-budget methods")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per method")
    parser.add_argument("--encoder-repeats", type=int, default=3, help="timed encoder passes")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    inputs = {}
    for batch in (1, 16):
        tokens, keys, attn = encoder_inputs(batch, NUM_PATCHES, WIDTH, HEADS)
        side = int(NUM_PATCHES**0.5)
        inputs[batch] = VisionInputs(tokens, keys, attn, (side, side))

    report: dict[str, dict[str, float | str]] = {}
    with torch.inference_mode():
        for name in method_names():
            method = build(name, args.keep)
            row: dict[str, float | str] = {"budget": method.describe_budget()}  # type: ignore[attr-defined]
            # Methods that prune inside the LLM (FastV) do nothing on the vision side.
            row["where"] = "LLM" if getattr(method, "inside_llm", False) else "vision"
            for batch, data in inputs.items():
                result = method.reduce(data)  # type: ignore[attr-defined]
                median, spread = timed(partial(method.reduce, data), args.repeats)  # type: ignore[attr-defined]
                row[f"B{batch}_ms_per_image"] = median * 1e3 / batch
                row[f"B{batch}_spread_ms"] = spread * 1e3 / batch
                row[f"B{batch}_tokens"] = result.lengths.float().mean().item()
            report[name] = row

    encoder_ms, encoder_spread = encoder_forward_ms(args.encoder_repeats)
    for row in report.values():
        row["fraction_of_encoder_B1"] = float(row["B1_ms_per_image"]) / encoder_ms
    report["encoder"] = {"B1_ms": encoder_ms, "B1_spread_ms": encoder_spread}

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"Vision-side overhead, N={NUM_PATCHES}, C={WIDTH}, keep={args.keep} for fixed budgets, "
        f"torch threads={torch.get_num_threads()}, medians of {args.repeats} calls after warm-up"
    )
    print(
        f"{'method':<10} {'tokens':>7} {'B=1 ms/img':>14} {'B=16 ms/img':>14} {'% of encoder':>13}"
    )
    for name in method_names():
        r = report[name]
        note = "  (prunes inside the LLM; nothing here)" if r["where"] == "LLM" else ""
        print(
            f"{name:<10} {r['B1_tokens']:>7.1f} "
            f"{r['B1_ms_per_image']:>8.2f} ±{r['B1_spread_ms']:<4.1f}"
            f"{r['B16_ms_per_image']:>8.2f} ±{r['B16_spread_ms']:<4.1f}"
            f"{100 * float(r['fraction_of_encoder_B1']):>12.2f}%{note}"
        )
    print(
        f"ViT-L/14-336 encoder forward, B=1: {encoder_ms:.0f} ms ±{encoder_spread:.0f} "
        f"(random weights, median of {args.encoder_repeats}, same run)"
    )


if __name__ == "__main__":
    main()
