"""VisionZip against the release transcription (visionzip_release.py): the defaults equal it
exactly ([CLS] + 53 patches + 10 contextual tokens for keep=64)."""

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
from .visionzip_release import visionzip_release


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "heads"), SHAPES, ids=SHAPE_IDS)
def test_default_equals_the_release_op_level(batch, num, width, heads):
    tensors = tower_tensors(batch, num, width, heads, seed=num + batch)
    method = build_method("visionzip")  # keep=64: visionzip(model, 54, 10)
    reduction = method.reduce(tensors.inputs(method))
    attentions, key_states = tensors.attentions, tensors.key_states
    assert reduction.lengths.tolist() == [64] * batch
    for row in range(batch):
        expected, kept = visionzip_release(
            tensors.hidden[row], attentions[row], key_states[row], dominant=54, contextual=10
        )
        assert kept[0] == 0 and len(kept) == 54  # [CLS] and 53 patches
        assert reduction.index[row].tolist() == [-1] + [t - 1 for t in kept[1:]] + [-1] * 10
        torch.testing.assert_close(reduction.tokens[row].double(), expected, rtol=1e-5, atol=1e-5)


def test_the_former_formula_and_metric_are_options():
    tensors = tower_tensors(1, 256, 384, 6)
    attentions, key_states = tensors.attentions, tensors.key_states
    expected, _ = visionzip_release(
        tensors.hidden[0], attentions[0], key_states[0], dominant=54, contextual=10
    )
    for options in ({"contextual_merge": "mean"}, {"metric": "keys"}):
        method = build_method("visionzip", **options)
        tokens = method.reduce(tensors.inputs(method)).tokens[0].double()
        assert torch.equal(tokens[:54], expected[:54].to(tokens))  # dominant: the same
        assert not torch.allclose(tokens[54:], expected[54:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_projector_are_the_releases(batch):
    # The release reads attentions[-2], hidden_states[-2] and layers[-2]'s keys: on this
    # 4-layer tower, layer 2 (the one that outputs the selected features).
    model = release_llava()
    pixels = images(batch)
    run = run_tower(model, pixels)
    hidden, attentions, k = run.hidden_states[-2], run.attentions[-2], run.k[-2]
    heads = attentions.shape[1]
    key_states = k.view(*k.shape[:2], heads, -1).transpose(1, 2)
    got, _ = projector_inputs(model, "visionzip", pixels, keep=16, contextual=4)
    for row in range(batch):
        expected, _ = visionzip_release(
            hidden[row], attentions[row], key_states[row], dominant=12, contextual=4
        )
        torch.testing.assert_close(got[row].double(), expected, rtol=1e-5, atol=1e-5)
