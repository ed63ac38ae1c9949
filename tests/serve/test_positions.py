"""The served Qwen2.5-VL's M-RoPE positions equal the Hugging Face adapter's (main environment)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import prumerge
from prumerge.models import tiny
from prumerge.serve.positions import ReducedImage, reduced_mrope_positions
from tests.scripts import load_script

PROMPT = (
    "<|im_start|>user\nwhat<|vision_start|><|image_pad|><|vision_end|>is"
    "<|vision_start|><|image_pad|><|vision_end|>the shape?<|im_end|>\n<|im_start|>assistant\n"
)


def _images() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    sizes = [(24, 32), (24, 32)]  # one shape: the adapter reduces them as one batch
    return [
        Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).byte().numpy())
        for h, w in sizes
    ]


@pytest.mark.parametrize(("method", "options"), [("prumerge", {}), ("prumerge+", {"keep": 4})])
def test_reduced_mrope_positions_equal_the_adapters(method: str, options: dict):
    """Prefill and decode positions the Hugging Face path gives its language model, for a
    prompt with two reduced images, equal those the served model computes from the anchors."""
    script = load_script("tiny_checkpoints")
    torch.manual_seed(0)
    model, processor = script.qwen2_5_vl()
    model = tiny.peaked(model.eval())
    seen: list[torch.Tensor] = []

    def record(_module, _args, kwargs):
        seen.append(kwargs["position_ids"])

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    inputs = processor(images=_images(), text=[PROMPT], return_tensors="pt")
    try:
        with prumerge.apply(model, method, **options) as handle, torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    reduction = handle.last_reduction
    prefill, decode = seen[0][:, 0], seen[1][:, 0]  # (3, L) and (3, 1)
    merge = model.config.vision_config.spatial_merge_size
    image_id = model.config.image_token_id
    ids = inputs["input_ids"][0].tolist()
    counts = reduction.lengths.tolist()
    # The reduced prompt: each image's run cut to its count, as vLLM's processor writes it.
    reduced, images, grids = [], [], inputs["image_grid_thw"].tolist()
    index = 0
    position = 0
    while position < len(ids):
        if ids[position] != image_id:
            reduced.append(ids[position])
            position += 1
            continue
        _, h, w = grids[index]
        count = counts[index]
        anchors = reduction.anchors()[index, :count]
        images.append(ReducedImage(len(reduced), (h // merge, w // merge), anchors))
        reduced.extend([image_id] * count)
        position += h * w // merge**2
        index += 1
    assert index == 2
    positions, delta = reduced_mrope_positions(len(reduced), images)
    assert positions.shape == prefill.shape
    assert torch.equal(positions, prefill)
    assert torch.equal(decode[:, 0], torch.full((3,), len(reduced) + delta))
