"""DART against the release transcription (dart_release.py): the same image tokens kept on
random inputs at two shapes, and on a tiny random LLaVA the same positions kept from layer K
and the same final hidden states (logits). ``keep`` counts the 4 image pivots: the release's
``max_num_trunction`` T keeps T + 4."""

import pytest
import torch

import prumerge
from prumerge.ops.duplication import pivot_duplication_keep

from .dart_release import dart_release, dart_retained
from .harness import IMAGE_TOKEN, NUM_PATCHES, images, release_llava

BEFORE, AFTER = [1, 5, 9], [4, 6, 7, 3, 8, 2]


@pytest.mark.parametrize(("image_length", "width", "trunction"), [(576, 4096, 128), (256, 512, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_equals_the_release_on_random_inputs(image_length, width, trunction, seed):
    gen = torch.Generator().manual_seed(seed)
    start, text = 35, 40
    length = start + image_length + text
    keys = torch.randn(length, width, generator=gen)
    states = torch.randn(length, width // 2, generator=gen)
    expected = sorted(
        dart_retained(
            keys,
            states,
            image_start=start,
            image_length=image_length,
            max_num_trunction=trunction,
        )
    )
    image, after = slice(start, start + image_length), slice(start + image_length, None)
    kept = pivot_duplication_keep(
        keys[image],
        keys[after],
        states[image],
        states[after],
        trunction + 4,
        image_positions=list(range(start, start + image_length)),
        text_positions=list(range(start + image_length, length)),
    )
    assert (kept.nonzero().flatten() + start).tolist() == expected
    assert len(expected) == trunction + 4


def _prompts(batch):
    rows = [
        [b + t for t in BEFORE] + [IMAGE_TOKEN] * NUM_PATCHES + [b + t for t in AFTER]
        for b in range(batch)
    ]
    return torch.tensor(rows)


@pytest.mark.parametrize("trunction", [16, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_default_equals_the_release_model_level(batch, trunction):
    model = release_llava()
    model.set_attn_implementation("sdpa")
    ids, pixels = _prompts(batch), images(batch)
    language_model = model.model.language_model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixels).pooler_output
        embeds[ids == IMAGE_TOKEN] = torch.cat(list(features)).to(embeds)
        with prumerge.apply(model, "dart", keep=trunction + 4) as handle:
            handle.fastv.disarm = lambda: None  # keep the call's state for inspection
            logits = model(input_ids=ids, pixel_values=pixels).logits
            dropped = handle.fastv.call.dropped
        assert handle.stats.tokens_out == [trunction + 4] * batch
        for row in range(batch):
            hidden, kept = dart_release(
                language_model,
                embeds[row],
                image_start=len(BEFORE),
                image_length=NUM_PATCHES,
                max_num_trunction=trunction,
            )
            assert (~dropped[row]).nonzero().flatten().tolist() == kept
            torch.testing.assert_close(logits[row], model.lm_head(hidden), rtol=1e-4, atol=1e-4)
