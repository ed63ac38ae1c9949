"""FastV against the release transcription (fastv_release.py): the same positions kept from
layer K, and the same final hidden states (logits) on a tiny random LLaVA.

The release ranks every row of a batch by row 0's attention; prumerge ranks each row by its
own (docs/methods.md), so a batch is checked row by row against the release run alone."""

import pytest
import torch

import prumerge

from .fastv_release import fastv_release
from .harness import IMAGE_TOKEN, NUM_PATCHES, images, release_llava

BEFORE, AFTER = [1, 5, 9], [4, 6, 7, 3]


def _prompts(batch):
    rows = [
        [b + t for t in BEFORE] + [IMAGE_TOKEN] * NUM_PATCHES + [b + t for t in AFTER]
        for b in range(batch)
    ]
    return torch.tensor(rows)


@pytest.mark.parametrize("batch", [1, 4])
def test_default_equals_the_release_model_level(batch):
    model = release_llava()
    ids, pixels = _prompts(batch), images(batch)
    language_model = model.model.language_model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixels).pooler_output
        embeds[ids == IMAGE_TOKEN] = torch.cat(list(features)).to(embeds)
        with prumerge.apply(model, "fastv", keep=16, layer=2) as handle:
            handle.fastv.disarm = lambda: None  # keep the call's state for inspection
            logits = model(input_ids=ids, pixel_values=pixels).logits
            dropped = handle.fastv.call.dropped
        for row in range(batch):
            hidden, kept = fastv_release(
                language_model,
                embeds[row],
                image_start=len(BEFORE),
                image_length=NUM_PATCHES,
                keep=16,
                layer=2,
            )
            assert (~dropped[row]).nonzero().flatten().tolist() == kept
            torch.testing.assert_close(logits[row], model.lm_head(hidden), rtol=1e-4, atol=1e-4)
