"""Qwen3-VL: the DeepStack features follow the reduction, token for token."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .families import CASES, IMAGE_TOKEN, build_batch
from .test_families import ROWS, generate, greedy_without_cache, logits

CASE = CASES["qwen3_vl"]


def nudge_deepstack(model, layer, group):
    """A hook that changes one merger group's feature of one DeepStack layer (the group's
    row in the whole call's merged output)."""

    def hook(_module, _inputs, output):
        output = output.clone()
        output[group] += 3.0
        return output

    return model.model.visual.deepstack_merger_list[layer].register_forward_hook(hook)


def kept_and_pruned_group(handle):
    """Image 0's first kept and first pruned merger group (image 0 comes first in the call's
    merged output, so its groups are the first rows)."""
    encoded_group, row = handle.adapter.last_placements[0]
    kept = handle.last_reductions[encoded_group].kept_mask[row]
    return int(kept.nonzero()[0]), int((~kept).nonzero()[0])


@pytest.fixture(scope="module")
def model():
    return CASE.build("sdpa", 0)


@pytest.mark.parametrize("layer", [0, 1])
def test_a_pruned_tokens_deepstack_feature_does_not_change_the_output(model, layer):
    inputs = build_batch(CASE, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        before = logits(model, inputs)
        kept, pruned = kept_and_pruned_group(handle)
        hook = nudge_deepstack(model, layer, pruned)
        try:
            after = logits(model, inputs)
        finally:
            hook.remove()
    assert torch.equal(after, before)
    # The change is no small one: without reduction the same token's feature moves the output.
    full = logits(model, inputs)
    hook = nudge_deepstack(model, layer, pruned)
    try:
        assert not torch.allclose(logits(model, inputs), full, atol=1e-3)
    finally:
        hook.remove()


@pytest.mark.parametrize("layer", [0, 1])
def test_a_kept_tokens_deepstack_feature_changes_the_output(model, layer):
    inputs = build_batch(CASE, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        before = logits(model, inputs)
        kept, _ = kept_and_pruned_group(handle)
        hook = nudge_deepstack(model, layer, kept)
        try:
            after = logits(model, inputs)
        finally:
            hook.remove()
    assert not torch.allclose(after, before, atol=1e-3)
    # Only row 0 (which holds image 0) sees it.
    assert torch.equal(after[1:], before[1:])


def test_deepstack_features_are_the_kept_groups_own_and_the_merged_groups_mean(model):
    inputs = CASE.images([0, 1, 2], seed=2)
    with torch.no_grad():
        own = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).deepstack_features  # per layer, per image: (G_i, H)
    for method, options in [("cls_topk", {"keep": 5}), ("pool", {"keep": 6})]:
        with torch.no_grad(), prumerge.apply(model, method, **options) as handle:
            handle.encode_images(**inputs)
            got = handle.adapter.deepstack_features()
            for image in range(3):
                group, row = handle.adapter.last_placements[image]
                reduction = handle.last_reductions[group]
                length = int(reduction.lengths[row])
                for layer in range(2):
                    features = own[layer][image]  # (G, H)
                    expected = []
                    for slot in range(length):
                        patch = int(reduction.index[row, slot])
                        if patch >= 0:
                            expected.append(features[patch])
                        else:
                            members = reduction.assignment[row] == slot
                            expected.append(features[members].mean(0))
                    torch.testing.assert_close(
                        got[image][layer], torch.stack(expected), rtol=1e-5, atol=1e-6
                    )
        if method == "pool":  # every token is a merged cell
            assert bool((handle.last_reductions[0].index[:, :6] < 0).all())


def test_every_pass_without_a_cache_sees_the_deepstack_features(model):
    inputs = build_batch(CASE, model, ROWS)
    passes = []
    # A forward hook sees the keyword arguments the decoder ran with (after the adapter's).
    hook = model.model.language_model.register_forward_hook(
        lambda _m, _a, kwargs, _out: passes.append(kwargs.get("visual_pos_masks")),
        with_kwargs=True,
    )
    try:
        with prumerge.apply(model, "prumerge", keep=6):
            greedy_without_cache(model, inputs, steps=3)
            cached = generate(model, inputs, max_new_tokens=3)
    finally:
        hook.remove()
    # Three uncached passes over the whole sequence, then generate's prefill and two steps
    # on the cache (which hold no image positions).
    assert [p is None for p in passes] == [False] * 4 + [True] * 2
    # Every full pass marks the 6 kept tokens of each row's image, and no generated token.
    assert [p.sum(dim=1).tolist() for p in passes[:4]] == [[6, 6, 6]] * 4
    assert [p.shape[1] for p in passes[:3]] == [passes[3].shape[1] + i for i in range(3)]
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 3


def test_llm_side_methods_inside_the_deepstack_layers_are_refused(model):
    with pytest.raises(PrumergeError, match="DeepStack features .* supported: layer >= 2"):
        prumerge.apply(model, "fastv", keep=4, layer=1)
    with pytest.raises(PrumergeError, match="QK-norm"):
        prumerge.apply(model, "fastv", keep=4, layer=2)


def test_shortened_prompt_marks_exactly_the_kept_tokens(model):
    inputs = build_batch(CASE, model, ROWS)
    with prumerge.apply(model, "random", keep=3) as handle:
        prepared = handle.prepare_inputs(
            inputs["input_ids"],
            inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            image_grid_thw=inputs["image_grid_thw"],
        )
        armed = handle.adapter._armed
        assert torch.equal(armed.mask, prepared["input_ids"] == IMAGE_TOKEN)
        assert [f.shape[0] for f in armed.features] == [9, 9]
        handle._disarm()
        assert handle.adapter._armed is None
