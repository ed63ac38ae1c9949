"""DivPrune against the release transcription (divprune_release.py): selection on the
projector's outputs, kept in index order."""

import pytest
import torch

from prumerge.methods import VisionInputs, build_method

from .divprune_release import divprune_release
from .harness import BATCHES, SHAPE_IDS, SHAPES, images, llm_inputs, release_llava, run_tower


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "heads"), SHAPES, ids=SHAPE_IDS)
def test_default_equals_the_release_op_level(batch, num, width, heads):
    gen = torch.Generator().manual_seed(num + batch)
    projected = torch.randn(batch, num, width, generator=gen)  # the LLM's input embeddings
    method = build_method("divprune")
    assert method.feature_space == "projected"
    reduction = method.reduce(VisionInputs(features=projected, space="projected"))
    for row in range(batch):
        kept = divprune_release(projected[row], 64)
        assert reduction.index[row].tolist() == kept
        assert torch.equal(reduction.tokens[row], projected[row, kept])


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_llm_are_the_releases(batch):
    model = release_llava()
    pixels = images(batch)
    hidden = run_tower(model, pixels).hidden_states[-2]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(hidden[:, 1:])
    got = llm_inputs(model, "divprune", pixels, keep=16)
    for row in range(batch):
        kept = divprune_release(projected[row], 16)
        torch.testing.assert_close(got[row], projected[row, kept])
