"""``vispruner`` against the release transcription (vispruner_release.py): [CLS] attention of
the layer that outputs the features, int(T r) important patches, the rest de-duplicated."""

import pytest
import torch

from prumerge.methods import build_method

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
from .vispruner_release import vispruner_release


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "heads"), SHAPES, ids=SHAPE_IDS)
def test_default_equals_the_release_op_level(batch, num, width, heads):
    tensors = tower_tensors(batch, num, width, heads, seed=num + batch)
    method = build_method("vispruner")  # keep=64, important_ratio=0.5
    reduction = method.reduce(tensors.inputs(method))
    attentions = tensors.attentions
    for row in range(batch):
        expected, kept = vispruner_release(tensors.hidden[row], attentions[row], 64, 0.5)
        assert reduction.index[row].tolist() == kept
        torch.testing.assert_close(reduction.tokens[row].double(), expected)


@pytest.mark.parametrize(("keep", "ratio"), [(128, 0.5), (64, 0.75), (40, 0.0), (30, 1.0)])
def test_other_release_settings_op_level(keep, ratio):
    tensors = tower_tensors(2, 576, 64, 4, seed=keep)
    method = build_method("vispruner", keep=keep, important_ratio=ratio)
    reduction = method.reduce(tensors.inputs(method))
    for row in range(2):
        _, kept = vispruner_release(tensors.hidden[row], tensors.attentions[row], keep, ratio)
        assert reduction.index[row].tolist() == kept


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_projector_are_the_releases(batch):
    model = release_llava()
    pixels = images(batch)
    run = run_tower(model, pixels)
    got, _ = projector_inputs(model, "vispruner", pixels, keep=16)
    for row in range(batch):
        expected, _ = vispruner_release(
            run.hidden_states[-2][row], run.attentions[-2][row], 16, 0.5
        )
        torch.testing.assert_close(got[row].double(), expected)


def test_an_odd_residual_count_runs_where_the_release_crashes():
    # T = 66, r = 0.5: R = 576 - 33 is odd (the release's expand raises); every count is met.
    tensors = tower_tensors(1, 576, 64, 4)
    method = build_method("vispruner", keep=66)
    reduction = method.reduce(tensors.inputs(method))
    assert reduction.lengths.tolist() == [66]
    assert reduction.attention_selected.sum().item() == 33
