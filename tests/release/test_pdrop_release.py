"""PyramidDrop against the release transcription (pdrop_release.py) on a tiny random LLaVA:
the same prompt positions reach the last layer, with the same final hidden states (logits);
each row of a batch against the release run alone. The schedule is the release's geometric
one (ratio 0.5) on layers that fit the tiny decoder; the budget solver is checked to give the
release's own schedule back at its "equivalent tokens"."""

import pytest
import torch

import prumerge
from prumerge.methods.pdrop import budget_schedule, geometric_schedule, layer_mean

from .harness import IMAGE_TOKEN, NUM_PATCHES, images, release_llava
from .pdrop_release import pdrop_release

BEFORE, AFTER = [1, 5, 9], [4, 6, 7, 3, 8, 2]


def _prompts(batch):
    rows = [
        [b + t for t in BEFORE] + [IMAGE_TOKEN] * NUM_PATCHES + [b + t for t in AFTER]
        for b in range(batch)
    ]
    return torch.tensor(rows)


@pytest.mark.parametrize("layers", [(1, 2), (2,)])
@pytest.mark.parametrize("batch", [1, 4])
def test_default_equals_the_release_model_level(batch, layers):
    model = release_llava()
    model.set_attn_implementation("sdpa")
    ids, pixels = _prompts(batch), images(batch)
    language_model = model.model.language_model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.model.get_image_features(pixels).pooler_output
        embeds[ids == IMAGE_TOKEN] = torch.cat(list(features)).to(embeds)
        with prumerge.apply(model, "pdrop", layers=layers) as handle:
            handle.fastv.disarm = lambda: None  # keep the call's state for inspection
            logits = model(input_ids=ids, pixel_values=pixels).logits
            dropped = handle.fastv.call.dropped
        expected_tokens = [NUM_PATCHES // 2 ** len(layers)] * batch
        assert handle.stats.tokens_out == expected_tokens
        for row in range(batch):
            hidden, kept = pdrop_release(
                language_model,
                embeds[row],
                image_start=len(BEFORE),
                image_length=NUM_PATCHES,
                layer_list=list(layers),
                ratios=[1.0, 0.5, 0.25, 0.125],
            )
            assert (~dropped[row]).nonzero().flatten().tolist() == kept
            torch.testing.assert_close(logits[row], model.lm_head(hidden), rtol=1e-4, atol=1e-4)


def test_release_schedule_and_its_budget():
    release = geometric_schedule(576, (8, 16, 24), 0.5, 32)
    assert release == [(8, 288), (16, 144), (24, 72)]
    assert layer_mean(576, release, 32) == 270
    assert budget_schedule(576, 270, (8, 16, 24), 32) == release


@pytest.mark.parametrize("budget", [64, 128, 144, 192, 300])
def test_budgets_are_met_from_below(budget):
    stages = budget_schedule(576, budget, (8, 16, 24), 32)
    assert budget - 3 <= layer_mean(576, stages, 32) <= budget


def test_budget_schedules_keep_the_release_shape():
    assert budget_schedule(576, 64, (8, 16, 24), 32) == [(1, 236), (2, 97), (3, 39)]
    assert budget_schedule(576, 128, (8, 16, 24), 32) == [(2, 297), (4, 153), (6, 78)]
    assert budget_schedule(576, 192, (8, 16, 24), 32) == [(5, 282), (10, 139), (15, 68)]
