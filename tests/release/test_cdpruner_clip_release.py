"""``cdpruner`` with ``relevance="clip"`` against the release transcription (cdpruner_release.py)
with the relevance the release computes from CLIP: the text tower's ``text_embeds`` of the
question, tokenized whole and cut into 77-token rows (Theia-4869/CDPruner at 9541616,
``llava/model/multimodal_encoder/clip_encoder.py``: ``load_text_tower`` and ``forward``), and
the patches as ``visual_projection(post_layernorm(hidden_states[-2][:, 1:]))``, the projection
from ``CLIPVisionModelWithProjection`` of the same checkpoint and the norm from the model's
own tower.

The CLIP checkpoint is a tiny random ``CLIPModel`` saved in the test (``tests/tiny_clip.py``),
its vision encoder the tiny LLaVA's tower (as LLaVA-1.5's tower is CLIP-L/14-336's), with a
real ``CLIPTokenizer`` (one token per character, so a question of more than 75 characters
takes two rows). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

import prumerge
from prumerge.errors import PrumergeError
from prumerge.methods import build_method
from tests.eval.tiny_model import build_tokenizer
from tests.tiny_clip import save_tiny_clip

from .cdpruner_release import cdpruner_release
from .harness import BATCHES, IMAGE_TOKEN, NUM_PATCHES, images, release_llava

QUESTIONS = [
    "what color is the object ?",
    # 101 characters: two rows of CLIP's 77 positions
    "is there a red circle to the left of the blue square ? answer the question using a single "
    "word or phrase .",
    "how many are there ?",
    "is the star above the cross ?",
]


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tower = release_llava().model.vision_tower
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tower)


def _prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows "<bos> 5 6 <image>*N question" (the question alone after the image,
    as the release's text is the question alone)."""
    tokenizer = build_tokenizer()
    rows = [
        [1, 5, 6] + [IMAGE_TOKEN] * NUM_PATCHES + tokenizer(q, add_special_tokens=False).input_ids
        for q in QUESTIONS[:batch]
    ]
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids, mask


def _release_text_embeds(checkpoint: Path, question: str) -> torch.Tensor:
    """The release's ``text_embeds`` of one question: (segments, D)."""
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    tower = CLIPTextModelWithProjection.from_pretrained(str(checkpoint)).eval()
    context = tower.config.max_position_embeddings
    inputs = tokenizer(text=question, return_tensors="pt")
    segments = (inputs["input_ids"].shape[1] - 1) // context + 1
    padding = context * segments - inputs["input_ids"].shape[1]
    rows = {
        k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, context)
        for k, v in inputs.items()
    }
    with torch.no_grad():
        return tower(**rows).text_embeds


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_llm_are_the_releases_with_clip_relevance(
    batch: int, clip_checkpoint: Path
) -> None:
    model = release_llava()
    pixels = images(batch)
    ids, mask = _prompts(batch)
    projection = CLIPVisionModelWithProjection.from_pretrained(str(clip_checkpoint))
    with torch.no_grad():
        tower = model.model.vision_tower
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        projected = model.model.multi_modal_projector(hidden)
        image_embeds = projection.visual_projection(tower.post_layernorm(hidden).float())
        options = dict(keep=16, relevance="clip", text_tower=str(clip_checkpoint))
        with prumerge.apply(model, "cdpruner", processor=build_tokenizer(), **options) as handle:
            prepared = handle.prepare_inputs(ids, pixels, attention_mask=mask)
            assert handle.adapter.instruction_texts is None  # only during the call
    embeds, kept_ids = prepared["inputs_embeds"], prepared["input_ids"]
    for row in range(batch):
        text = _release_text_embeds(clip_checkpoint, QUESTIONS[row])
        assert text.shape[0] == (2 if row == 1 else 1)
        expected, _ = cdpruner_release(projected[row], image_embeds[row], text, 16)
        got = embeds[row][kept_ids[row] == IMAGE_TOKEN]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # the CLIP relevance is not the LLM one: on these inputs they keep other patches
    with torch.no_grad(), prumerge.apply(model, "cdpruner", keep=16) as handle:
        llm = handle.prepare_inputs(ids, pixels, attention_mask=mask)["inputs_embeds"]
    assert not torch.equal(llm, embeds)


def test_clip_relevance_checks_its_options(clip_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relevance='clip' needs text_tower"):
        build_method("cdpruner", relevance="clip")
    with pytest.raises(ValueError, match="text_tower is read only with relevance='clip'"):
        build_method("cdpruner", text_tower=str(clip_checkpoint))
    with pytest.raises(ValueError, match="no checkpoint directory"):
        build_method("cdpruner", relevance="clip", text_tower=str(tmp_path))
    method = build_method("cdpruner", relevance="clip", text_tower=str(clip_checkpoint))
    with pytest.raises(PrumergeError, match="processor=processor"):
        prumerge.apply(release_llava(), method)  # no tokenizer to read the instruction with


def test_a_tower_of_another_width_is_a_one_line_error(clip_checkpoint: Path) -> None:
    from tests.adapters.conftest import tiny_llava

    model = tiny_llava("clip")  # width 32; the checkpoint's tower is 48 wide
    ids = torch.tensor([[1, 5] + [IMAGE_TOKEN] * 36 + [7, 8]])
    pixels = torch.randn(1, 3, 42, 42)
    options = dict(relevance="clip", text_tower=str(clip_checkpoint), keep=4)
    with prumerge.apply(model, "cdpruner", processor=build_tokenizer(), **options) as handle:
        with pytest.raises(PrumergeError, match="reads patch features of width 48"):
            handle.prepare_inputs(ids, pixels)
        # without a prompt there is no relevance to compute: a plain diversity DPP
        assert [f.shape[0] for f in handle.encode_images(pixels)] == [4]
