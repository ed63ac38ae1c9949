"""Measured prefill time against visual-token count, beside the roofline model's prediction.

A LLaVA-1.5-shaped decoder (LlamaForCausalLM with random weights: hidden 4096, 32 heads,
MLP 11008, vocab 32000) cut to a few layers so that it runs on a small CPU, is timed on
prompts of visual + text tokens. The cost model (prumerge.cost) predicts the same shapes on a
"this CPU" hardware spec whose bandwidth and peak are measured first (a large copy and a large
matmul). What matters is the ratios against the largest visual-token count, measured side by
side in one run: the counts are timed round-robin, after a warm-up round, several times, and
the median and the spread (min-max) are reported.

Not a test. Example (about two minutes on 2 cores):

    python benchmarks/prefill_scaling.py --out prefill_scaling.png
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prumerge.cost import DecoderSpec, Precision, analyze_prefill, custom_hardware


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="path of the PNG plot")
    p.add_argument("--visual-tokens", default="576,288,144,64,32")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()


def measure_cpu(reps: int = 5) -> tuple[float, float]:
    """Best-of-``reps`` FP32 matmul rate (ops/s) and copy bandwidth (bytes/s) of this CPU."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    src = torch.empty(64 * 2**20 // 4)  # 64 MiB, well past the caches
    dst = torch.empty_like(src)
    torch.mm(a, b)
    dst.copy_(src)
    best_mm = best_copy = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best_mm = min(best_mm, time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t0)
    peak = 2 * n**3 / best_mm
    bandwidth = 2 * src.numel() * 4 / best_copy  # read + write
    return peak, bandwidth


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    counts = [int(c) for c in args.visual_tokens.split(",")]
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    config._attn_implementation = args.attn
    model = LlamaForCausalLM(config).eval()
    spec = DecoderSpec(
        "llava-1.5-shaped", args.hidden, args.layers, args.heads, args.heads,
        args.intermediate, args.vocab,
    )  # fmt: skip

    peak, bandwidth = measure_cpu()
    cpu = custom_hardware(bandwidth, peak, name="this CPU")
    fp32 = Precision(32, 32, 32)
    print(
        f"this CPU: {torch.get_num_threads()} threads, FP32 matmul {peak / 1e9:.1f} GFLOP/s, "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (ridge {peak / bandwidth:.1f} ops/byte)"
    )
    print(
        f"decoder: {args.layers} layers x hidden {args.hidden}, {args.heads} heads, MLP "
        f"{args.intermediate}, vocab {args.vocab}, FP32, {args.attn} attention; prompt = visual "
        f"+ {args.text_tokens} text tokens; {args.warmup} warm-up + {args.reps} timed rounds"
    )

    inputs = {
        c: torch.randint(0, args.vocab, (1, c + args.text_tokens), generator=torch.Generator().manual_seed(c))
        for c in counts
    }  # fmt: skip
    times: dict[int, list[float]] = {c: [] for c in counts}
    with torch.inference_mode():
        for rnd in range(args.warmup + args.reps):
            for c in counts:  # round-robin, so drift on a shared machine hits every count
                t0 = time.perf_counter()
                model(input_ids=inputs[c], use_cache=True, logits_to_keep=1)
                elapsed = time.perf_counter() - t0
                if rnd >= args.warmup:
                    times[c].append(elapsed)

    base = counts[0]
    predicted = {c: analyze_prefill(spec, cpu, c + args.text_tokens, 1, fp32) for c in counts}
    median = {c: statistics.median(times[c]) for c in counts}
    header = (
        f"{'visual':>6} {'prompt':>6} {'median ms':>10} {'min-max ms':>17} {'median':>7} "
        f"{'min':>6} {'roofline':>9} {'FLOPs':>7} {'roofline ms':>12}"
    )
    print()
    print(
        f"ratios are against {base} visual tokens: measured (median, min), predicted (roofline, FLOPs)"
    )
    print(header)
    for c in counts:
        print(
            f"{c:>6} {c + args.text_tokens:>6} {median[c] * 1e3:>10.1f} "
            f"{min(times[c]) * 1e3:>8.1f}-{max(times[c]) * 1e3:<8.1f} "
            f"{median[c] / median[base]:>7.3f} {min(times[c]) / min(times[base]):>6.3f} "
            f"{predicted[c].time / predicted[base].time:>9.3f} "
            f"{predicted[c].ops / predicted[base].ops:>7.3f} {predicted[c].time * 1e3:>12.1f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = counts
    fig, ax = plt.subplots(figsize=(6, 4))
    meas = [median[c] / median[base] for c in xs]
    lo = [m - min(times[c]) / median[base] for m, c in zip(meas, xs, strict=True)]
    hi = [max(times[c]) / median[base] - m for m, c in zip(meas, xs, strict=True)]
    ax.errorbar(xs, meas, yerr=[lo, hi], fmt="o-", capsize=3, label="measured (median, min-max)")
    ax.plot(xs, [predicted[c].time / predicted[base].time for c in xs], "s--",
            label="roofline, this CPU")  # fmt: skip
    ax.plot(xs, [predicted[c].ops / predicted[base].ops for c in xs], ":", label="FLOPs")
    ax.set_xlabel(f"visual tokens (+ {args.text_tokens} text)")
    ax.set_ylabel(f"prefill time relative to {base} visual tokens")
    ax.set_title(f"{args.layers}-layer LLaVA-1.5-shaped decoder, FP32 CPU")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"\nplot saved to {args.out}")


if __name__ == "__main__":
    main()
