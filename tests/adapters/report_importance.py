"""[CLS] attention against mean attention on InternVL's tiny test configuration.

    python -m tests.adapters.report_importance [--images 24] [--keep 4]

Builds the tiny random InternVL of ``families.CASES`` (no downloads) and, over single-tile
images of random pixels, compares the two importance signals the adapter can read off the
last InternViT layer, both pooled over the pixel-shuffle groups: how similar they rank a
tile's tokens (Spearman), how many of the top ``keep`` tokens they share (chance:
keep / tokens), and how far the LLM's next-token distribution moves (KL from the
unreduced model) when ``cls_topk`` keeps the top tokens of each signal, or a random set.

What this can show on random weights: that the signals are read correctly and how much they
disagree. What it cannot show: which one serves a trained InternVL better; random weights
give neither signal a meaning, and the KL of a random LLM says nothing about answers.
"""

from __future__ import annotations

import argparse

import torch

import prumerge

from .families import CASES, IMAGE_TOKEN

TEXT = [3, 4, 5]  # a few text tokens after the image


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) rank correlation of every row of a with the same row of b."""
    ra = a.argsort(-1).argsort(-1).float()
    rb = b.argsort(-1).argsort(-1).float()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def measure(images: int, keep: int, seed: int = 0) -> dict[str, float]:
    case = CASES["internvl"]
    model = case.build("sdpa", 0)
    tile = model.config.vision_config.image_size[0]
    pixels = torch.randn(images, 3, tile, tile, generator=torch.Generator().manual_seed(seed))
    scale = torch.linspace(0.3, 3.0, images)[:, None, None, None]  # varied contrast
    pixels = pixels * scale
    signals, kept = {}, {}
    for importance in ("cls", "mean"):
        seen = []
        with prumerge.apply(model, "cls_topk", keep=keep, importance=importance) as handle:
            original = handle.method.reduce
            handle.method.reduce = lambda batch, seen=seen, original=original: (
                seen.append(batch) or original(batch)
            )
            handle.encode_images(pixels, num_patches=[1] * images)
            kept[importance] = handle.last_reductions[0].kept_mask  # (images, n)
        signals[importance] = seen[0].cls_attn  # (images, n)
    tokens = signals["cls"].shape[1]
    shared = (kept["cls"] & kept["mean"]).sum(-1).float() / keep
    ids = torch.tensor([[1, *[IMAGE_TOKEN] * tokens, *TEXT]])

    def next_token(method: str, **options: object) -> torch.Tensor:
        out = []
        for i in range(images):
            inputs = {"input_ids": ids, "pixel_values": pixels[i : i + 1]}
            with torch.no_grad():
                if method == "full":
                    logits = model(**inputs).logits
                else:
                    with prumerge.apply(model, method, **options):
                        logits = model(**inputs).logits
            out.append(logits[0, -1].log_softmax(-1))
        return torch.stack(out)  # (images, V)

    full = next_token("full")

    def kl(reduced: torch.Tensor) -> float:
        return float((full.exp() * (full - reduced)).sum(-1).mean())

    return {
        "images": images,
        "tokens per tile": tokens,
        "keep": keep,
        "spearman(cls, mean)": float(spearman(signals["cls"], signals["mean"]).mean()),
        "top-keep shared": float(shared.mean()),
        "top-keep shared by chance": keep / tokens,
        "KL cls_topk importance=cls": kl(next_token("cls_topk", keep=keep, importance="cls")),
        "KL cls_topk importance=mean": kl(next_token("cls_topk", keep=keep, importance="mean")),
        "KL random": kl(next_token("random", keep=keep)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--keep", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for name, value in measure(args.images, args.keep).items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
