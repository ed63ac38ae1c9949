"""``hiprune`` against the release transcription (hiprune_release.py): anchors by the global
attention of layer 9, their raster neighbours, registers by that of the layer that outputs the
features; every image with the whole budget (the release divides it by the batch)."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError
from prumerge.methods import VisionInputs, build_method
from prumerge.ops import mean_attention

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
from .hiprune_release import hiprune_release


def two_layer_inputs(batch, num, width, heads, seed):
    deep = tower_tensors(batch, num, width, heads, seed=seed)
    shallow = tower_tensors(batch, num, width, heads, seed=seed + 1000)
    side = int(num**0.5)
    inputs = VisionInputs(
        features=deep.hidden[:, 1:],
        cls_attn=mean_attention(deep.q, deep.k, num_heads=heads, num_prefix_tokens=1),
        object_importance=mean_attention(
            shallow.q, shallow.k, num_heads=heads, num_prefix_tokens=1
        ),
        grid=(side, side),
    )
    return deep, shallow, inputs


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("num", "width", "heads"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("keep", [64, 192])
def test_default_equals_the_release_op_level(batch, num, width, heads, keep):
    deep, shallow, inputs = two_layer_inputs(batch, num, width, heads, seed=num + batch)
    reduction = build_method("hiprune", keep=keep).reduce(inputs)  # alpha=0.1
    deep_attn, shallow_attn = deep.attentions, shallow.attentions
    for row in range(batch):
        expected, kept = hiprune_release(deep.hidden[row], shallow_attn[row], deep_attn[row], keep)
        assert reduction.index[row].tolist() == kept
        torch.testing.assert_close(reduction.tokens[row].double(), expected)


def test_a_larger_alpha_equals_the_release_and_a_crashing_one_meets_the_budget():
    # alpha=0.5: 6 anchors of 64 and their clamped raster neighbours.
    deep, shallow, inputs = two_layer_inputs(2, 576, 64, 4, seed=3)
    reduction = build_method("hiprune", keep=64, alpha=0.5).reduce(inputs)
    for row in range(2):
        _, kept = hiprune_release(
            deep.hidden[row], shallow.attentions[row], deep.attentions[row], 64, alpha=0.5
        )
        assert reduction.index[row].tolist() == kept
    # alpha=5: 40 anchors and their buffers exceed 40 (the release's topk raises).
    assert build_method("hiprune", keep=40, alpha=5.0).reduce(inputs).lengths.tolist() == [40, 40]


def test_grid_buffers_stay_inside_the_grid():
    # An anchor in the top-left corner: the release adds patch 0 (itself) for -1 and -cols;
    # buffers="grid" adds its right and lower neighbours only.
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, 16, 8, generator=gen)
    shallow = torch.zeros(1, 16)
    shallow[0, 0] = 1.0
    deep = torch.zeros(1, 16)
    inputs = VisionInputs(features=features, cls_attn=deep, object_importance=shallow, grid=(4, 4))
    method = build_method("hiprune", keep=3, alpha=5 / 3, buffers="grid")  # 1 anchor
    assert method.reduce(inputs).attention_selected[0].nonzero().flatten().tolist() == [0, 1, 4]


@pytest.mark.parametrize("batch", BATCHES)
def test_the_tokens_reaching_the_projector_are_the_releases(batch):
    model = release_llava()  # 4 layers: the object layer is layer 2 here
    pixels = images(batch)
    run = run_tower(model, pixels)
    got, _ = projector_inputs(model, "hiprune", pixels, keep=16, alpha=1.0, object_layer=2)
    for row in range(batch):
        expected, _ = hiprune_release(
            run.hidden_states[-2][row], run.attentions[1][row], run.attentions[-2][row], 16, 1.0
        )
        torch.testing.assert_close(got[row].double(), expected)


def test_an_object_layer_beyond_the_tower_is_a_one_line_error():
    with pytest.raises(PrumergeError, match="object_layer=9 is out of range") as info:
        prumerge.apply(release_llava(), "hiprune")
    assert "\n" not in str(info.value)
