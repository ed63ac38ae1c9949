"""Vision-tower time of ToMe merging inside the tower against merging after it.

ToMe's released code merges inside the ViT, so every later layer runs on fewer tokens; the
former prumerge default ran the whole tower and merged its output once. This prints, measured
side by side in one run (warm-up, then interleaved repetitions, medians), the time of one
``ViTTower.run`` (the tower forward plus the reduction) on a random CLIP ViT-L/14-336 tower
as LLaVA-1.5 has it (24 layers, width 1024, 16 heads, 576 patches, ``vision_feature_layer=-2``)
for: no reduction, ``tome`` (inside the tower) and ``tome`` with ``where="after"``, each at
the budgets given, as ratios to no reduction (of the medians, and of the fastest runs, which
other processes on a shared machine disturb least).

Usage: python benchmarks/tome_tower.py [--keep 64,144] [--batch 1] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from prumerge.adapters.towers import ViTTower
from prumerge.methods import build_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default="64,144")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=100,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.set_attn_implementation("sdpa")
    pixels = torch.randn(args.batch, 3, 336, 336)
    runs = {"none": ViTTower(model.model.vision_tower, config, build_method("none"))}
    for keep in (int(k) for k in args.keep.split(",")):
        for where in ("tower", "after"):
            method = build_method("tome", keep=keep, where=where)
            runs[f"tome keep={keep} where={where}"] = ViTTower(
                model.model.vision_tower, config, method
            )

    def run(name: str) -> None:
        tower = runs[name]
        out = tower.run(pixels)
        if out.reduction is None:
            tower.method.reduce(out.inputs)

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for name in runs:  # warm-up
            run(name)
        for _ in range(args.repeats):
            for name in runs:
                start = time.perf_counter()
                run(name)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["none"])
    fastest = min(times["none"])
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, {args.repeats} repeats")
    print(f"{'':28s} {'median':>9s}      {'ratio':>5s}    {'fastest':>9s}      {'ratio':>5s}")
    for name, values in times.items():
        median, low = statistics.median(values), min(values)
        print(
            f"{name:28s} {median * 1000:9.1f} ms   {median / base:5.2f}x   "
            f"{low * 1000:9.1f} ms   {low / fastest:5.2f}x"
        )


if __name__ == "__main__":
    main()
