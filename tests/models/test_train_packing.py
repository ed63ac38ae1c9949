"""Isolated packing on the real default model: a packed sequence of several questions gives
each answer the same loss as that question asked alone."""

from __future__ import annotations

import pytest
import torch

from tests.models.conftest import requires_default_weights

pytest.importorskip("transformers")

TURNS = [
    ("what is the blue shape?", "rectangle"),
    ("what color is the shape?\nAnswer the question using a single word or phrase.", "blue"),
    ("does the image contain a rectangle?", "yes"),
    ("is there a triangle in the image?", "no"),
]


@requires_default_weights
def test_isolated_packing_equals_separate_questions(default_model):
    from PIL import Image

    from prumerge.models.default import format_prompt
    from prumerge.models.train import (
        compute_patch_features,
        encode_isolated_turns,
        projector_loss,
    )

    model, processor = default_model
    n = model.config.image_seq_length
    image = Image.open("examples/easy-vqa-test-0.png")
    features = compute_patch_features(model, processor, [image])
    projector = model.model.multi_modal_projector

    ids, labels, positions, segments = encode_isolated_turns(processor, TURNS, n)
    # The shared prefix is stored once, then each question's own tokens.
    assert int((ids == model.config.image_token_id).sum()) == n
    assert segments.max().item() == len(TURNS)
    assert torch.equal(positions[segments == 0], torch.arange(int((segments == 0).sum())))
    with torch.no_grad():
        packed, count = projector_loss(
            model, projector, features, [ids], [labels], [positions], [segments]
        )
        total, separate_count = 0.0, 0
        for question, answer in TURNS:
            # Each question alone, as plain text through the processor's chat template.
            text = format_prompt(processor, question) + answer + "<|im_end|>"
            alone = processor.tokenizer(
                text.replace(processor.image_token, processor.image_token * n),
                add_special_tokens=False,
                return_tensors="pt",
            )["input_ids"][0]
            prompt_len = len(
                processor.tokenizer(
                    format_prompt(processor, question).replace(
                        processor.image_token, processor.image_token * n
                    ),
                    add_special_tokens=False,
                )["input_ids"]
            )
            alone_labels = torch.full_like(alone, -100)
            alone_labels[prompt_len:] = alone[prompt_len:]
            loss, k = projector_loss(model, projector, features, [alone], [alone_labels])
            total += loss.item() * k
            separate_count += k
        assert count == separate_count
        assert packed.item() == pytest.approx(total / separate_count, rel=1e-4, abs=1e-5)

        # Padding a shorter packed sequence next to it changes neither row's loss.
        short = encode_isolated_turns(processor, TURNS[:2], n)
        both, both_count = projector_loss(
            model,
            projector,
            features.expand(2, -1, -1),
            [ids, short[0]],
            [labels, short[1]],
            [positions, short[2]],
            [segments, short[3]],
        )
        alone_short, short_count = projector_loss(model, projector, features, *([x] for x in short))
    assert both.item() * both_count == pytest.approx(
        packed.item() * count + alone_short.item() * short_count, rel=1e-4
    )
