"""``cls_topk`` against the FasterVLM release transcription (fastervlm_release.py): the [CLS]
attention of the layer that outputs the features, averaged over heads, top-k in index order."""

import pytest
import torch

from prumerge.methods import build_method

from .fastervlm_release import fastervlm_release
from .harness import (
    BATCHES,
    SHAPE_IDS,
    SHAPES,
    images,
    projector_inputs,
    release_llava,
    run_tower,
    tower_tensors,
)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "heads"), SHAPES, ids=SHAPE_IDS)
def test_default_equals_the_release_op_level(batch, num, width, heads):
    tensors = tower_tensors(batch, num, width, heads, seed=num + batch)
    method = build_method("cls_topk")  # keep=64
    reduction = method.reduce(tensors.inputs(method))
    attentions = tensors.attentions
    for row in range(batch):
        expected, kept = fastervlm_release(tensors.hidden[row], attentions[row], 64)
        assert reduction.index[row].tolist() == kept
        torch.testing.assert_close(reduction.tokens[row].double(), expected)


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_projector_are_the_releases(batch):
    model = release_llava()
    pixels = images(batch)
    run = run_tower(model, pixels)
    got, _ = projector_inputs(model, "cls_topk", pixels, keep=16)
    for row in range(batch):
        expected, _ = fastervlm_release(run.hidden_states[-2][row], run.attentions[-2][row], 16)
        torch.testing.assert_close(got[row].double(), expected)


def test_the_consumer_layer_is_an_option():
    # prumerge's former default: the layer that consumes the features (attentions[-1] here).
    model = release_llava()
    pixels = images(2)
    run = run_tower(model, pixels)
    got, _ = projector_inputs(model, "cls_topk", pixels, keep=16, attention_source="consumer")
    for row in range(2):
        expected, _ = fastervlm_release(run.hidden_states[-2][row], run.attentions[-1][row], 16)
        torch.testing.assert_close(got[row].double(), expected)
