"""Batched generate on the embedded default model: rows keep different numbers of tokens.

Run from the repository root: .venv/bin/python examples/batched_generate.py
"""

import torch

import prumerge
from prumerge.images import load_image
from prumerge.loading import load_model

model, processor, prompt = load_model(None, cache_dir=None)
processor.tokenizer.padding_side = "left"
images = [
    load_image(p)
    for p in ["examples/easy-vqa-test-0.png", "examples/astronaut.jpg", "examples/coffee.jpg"]
]
questions = [
    "what is the color of the shape?",
    "is there a circle in the image?",
    "what shape is in the image?",
]
inputs = processor(
    images=images, text=[prompt(q) for q in questions], padding=True, return_tensors="pt"
)
n = inputs["input_ids"].shape[1]
with torch.inference_mode():
    ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for method in ("none", "prumerge", "prumerge+"):
        with prumerge.apply(model, method) as h:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        print(
            f"{method:10s} tokens_out={h.stats.tokens_out} answers={processor.batch_decode(out[:, n:], skip_special_tokens=True)} identical_to_unpatched={torch.equal(out, ref)}"
        )
    with prumerge.apply(model, "prumerge") as h:
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        rows = []
        for i in range(3):
            one = processor(images=[images[i]], text=[prompt(questions[i])], return_tensors="pt")
            o = model.generate(**one, max_new_tokens=4, do_sample=False)
            rows.append(o[0, one["input_ids"].shape[1] :].tolist())
    print(
        "prumerge batched rows == rows alone:",
        [batch[i, n:].tolist()[: len(rows[i])] == rows[i] for i in range(3)],
    )
