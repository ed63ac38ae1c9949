"""Isolated packing on the real default model, under reduction: a packed sequence of several
questions gives each answer the same loss as that question asked alone."""

from __future__ import annotations

import pytest
import torch

from tests.default_model import requires_default_weights

pytest.importorskip("transformers")

TURNS = [
    ("what is the blue shape?", "rectangle"),
    ("what color is the shape?\nAnswer the question using a single word or phrase.", "blue"),
    ("does the image contain a rectangle?", "yes"),
    ("is there a triangle in the image?", "no"),
]


@requires_default_weights
@pytest.mark.parametrize(
    "method, options", [("none", {}), ("prumerge", {}), ("visionzip", {"keep": 64})]
)
def test_isolated_packing_equals_separate_questions(default_model, method, options):
    from PIL import Image

    from prumerge.models.default import format_prompt
    from prumerge.train.packing import encode_isolated_turns
    from prumerge.train.step import step_loss

    model, processor = default_model
    n = model.config.image_seq_length
    image = Image.open("examples/easy-vqa-test-0.png").convert("RGB")

    def encode(turns):
        return encode_isolated_turns(
            processor, turns, n, lambda q: format_prompt(processor, q), "<|im_end|>"
        )

    packed = encode(TURNS)
    # The shared prefix is stored once, then each question's own tokens.
    assert int((packed.input_ids == model.config.image_token_id).sum()) == n
    assert packed.segments.max().item() == len(TURNS)
    prefix = packed.segments == 0
    assert torch.equal(packed.position_ids[prefix], torch.arange(int(prefix.sum())))
    with torch.no_grad():
        together, visual = step_loss(model, processor, method, options, [image], [packed], 1.0)
        alone = [encode([turn]) for turn in TURNS]
        separate = sum(
            step_loss(model, processor, method, options, [image], [s], 1.0)[0].item() for s in alone
        )
        # Padding a shorter packed sequence next to it changes neither row's loss.
        short = encode(TURNS[:2])
        both, _ = step_loss(model, processor, method, options, [image, image], [packed, short], 1.0)
        short_alone, _ = step_loss(model, processor, method, options, [image], [short], 1.0)
    assert together.item() == pytest.approx(separate, rel=1e-4, abs=1e-4)
    assert both.item() == pytest.approx(together.item() + short_alone.item(), rel=1e-4)
    assert visual == (n if method == "none" else visual) and (method == "none" or visual < n)
