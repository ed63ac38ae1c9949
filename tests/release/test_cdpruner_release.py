"""``cdpruner`` against the release transcription (cdpruner_release.py): a conditional DPP on
the projector's outputs, weighted by the min-max-normalised negative cosine relevance.

The release takes the relevance from CLIP (image ``visual_projection`` and text tower);
prumerge's default ``relevance="llm"`` takes the projected patches and the LLM's input
embeddings of the instruction (docs/methods.md). The op-level tests feed the transcription
and the op the same (CLIP-like) embeddings; the model-level tests feed the transcription
what ``relevance="llm"`` uses: the projected patches and the instruction's embeddings."""

import pytest
import torch

import prumerge
from prumerge.methods import VisionInputs, build_method
from prumerge.ops.cdpruner import cdpruner, instruction_relevance

from .cdpruner_release import cdpruner_release
from .harness import BATCHES, IMAGE_TOKEN, NUM_PATCHES, images, release_llava

#: (N, D projected, E embed, M text rows) of the op-level tests.
OP_SHAPES = [(576, 1024, 768, 1), (256, 384, 512, 3)]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "embed", "rows"), OP_SHAPES, ids=["576", "256"])
def test_the_op_equals_the_release_on_the_same_embeddings(batch, num, width, embed, rows):
    gen = torch.Generator().manual_seed(num + batch)
    projected = torch.randn(batch, num, width, generator=gen)
    image_embeds = torch.randn(batch, num, embed, generator=gen)
    text = torch.randn(batch, rows, embed, generator=gen)
    reduction = cdpruner(projected, instruction_relevance(image_embeds, text), keep=64)
    for row in range(batch):
        expected, kept = cdpruner_release(projected[row], image_embeds[row], text[row], 64)
        assert reduction.index[row].tolist() == kept
        torch.testing.assert_close(reduction.tokens[row].double(), expected)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width"), [(576, 1024), (256, 384)], ids=["576", "256"])
def test_the_default_method_equals_the_release_with_llm_embeddings(batch, num, width):
    gen = torch.Generator().manual_seed(num)
    projected = torch.randn(batch, num, width, generator=gen)
    instruction = torch.randn(batch, 7, width, generator=gen)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[1:, 5:] = False  # shorter instructions in the other rows
    inputs = VisionInputs(
        features=projected, space="projected", instruction=instruction, instruction_mask=mask
    )
    reduction = build_method("cdpruner").reduce(inputs)  # keep=64, relevance="llm"
    for row in range(batch):
        text = instruction[row][mask[row]]
        _, kept = cdpruner_release(projected[row], projected[row], text, 64)
        assert reduction.index[row].tolist() == kept


def _prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded prompts "<bos> 5 6 <image>*N question..." with questions of other lengths."""
    questions = [[7, 8, 9, 10], [11, 12], [13, 14, 15], [16]][:batch]
    rows = [[1, 5, 6] + [IMAGE_TOKEN] * NUM_PATCHES + q for q in questions]
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids, mask, [torch.tensor(q) for q in questions]


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_llm_are_the_releases_with_llm_relevance(batch):
    model = release_llava()
    pixels = images(batch)
    ids, mask, questions = _prompt(batch)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        projected = model.model.multi_modal_projector(hidden[:, 1:])
        with prumerge.apply(model, "cdpruner", keep=16) as handle:
            prepared = handle.prepare_inputs(ids, pixels, attention_mask=mask)
    embeds, kept_ids = prepared["inputs_embeds"], prepared["input_ids"]
    embed = model.get_input_embeddings()
    for row in range(batch):
        with torch.no_grad():
            text = embed(questions[row])
        expected, _ = cdpruner_release(projected[row], projected[row], text, 16)
        got = embeds[row][kept_ids[row] == IMAGE_TOKEN]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_without_a_prompt_the_relevance_is_flat():
    gen = torch.Generator().manual_seed(0)
    projected = torch.randn(1, 64, 32, generator=gen)
    got = build_method("cdpruner", keep=8).reduce(VisionInputs(features=projected))
    flat = build_method("cdpruner", keep=8, relevance="none")
    text = torch.randn(1, 3, 32, generator=gen)
    assert torch.equal(got.index, flat.reduce(VisionInputs(features=projected)).index)
    weighted = build_method("cdpruner", keep=8).reduce(
        VisionInputs(features=projected, instruction=text)
    )
    _, kept = cdpruner_release(projected[0], projected[0], text[0], 8)
    assert weighted.index[0].tolist() == kept
