"""The 20 fixed easy-vqa questions of tests/models/test_default_model.py, answered by both
shipped variants with none, adaptive PruMerge and adaptive PruMerge+ (batched, greedy): the
counts that the test's thresholds are set from.

Usage: python scripts/fixed_questions.py
"""

from __future__ import annotations

import torch
from PIL import Image

import prumerge
from prumerge.data.easy_vqa import first_questions_per_type
from prumerge.models import format_prompt, load_default_model, normalize_answer

QUOTA = {"yes/no": 8, "color": 6, "shape": 6}  # as in the test


def main() -> None:
    chosen = first_questions_per_type(QUOTA)
    truth = [answer for _, _, answer in chosen]
    for variant in ("default", "base"):
        model, processor = load_default_model(variant=variant)
        processor.tokenizer.padding_side = "left"
        images = [Image.open(path).convert("RGB") for path, _, _ in chosen]
        prompts = [format_prompt(processor, question) for _, question, _ in chosen]
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
        for method in ("none", "prumerge", "prumerge+"):
            with prumerge.apply(model, method) as handle, torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            answers = processor.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            correct = sum(normalize_answer(a) == t for a, t in zip(answers, truth, strict=True))
            tokens = list(handle.stats.tokens_out)
            print(f"{variant:8s} {method:10s} {correct:2d}/{len(chosen)}  tokens out: {tokens}")


if __name__ == "__main__":
    main()
