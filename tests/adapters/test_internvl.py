"""InternVL: tiles read off the prompt, budgets per image or per tile, and importance pooled
over the pixel-shuffle groups."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .families import CASES, INTERNVL_TILES, build_batch
from .test_families import ROWS, generate

CASE = CASES["internvl"]


@pytest.fixture(scope="module")
def model():
    return CASE.build("sdpa", 0)


def tile_lengths(handle):
    """Tokens each tile kept, over every reduction of the last call."""
    return sorted(n for r in handle.last_reductions for n in r.lengths.tolist())


def test_tiles_are_read_off_the_prompt_or_given(model):
    inputs = build_batch(CASE, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=0.25) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_in == [16, 48, 80] == inputs["counts"]
        got = handle.encode_images(inputs["pixel_values"], num_patches=INTERNVL_TILES)
        assert [f.shape[0] for f in got] == [4, 12, 20]
        with pytest.raises(PrumergeError, match="needs each image's tile count"):
            handle.encode_images(inputs["pixel_values"])
        with pytest.raises(
            PrumergeError, match="with 8 tiles \\(\\[1, 3, 4\\] per image\\); got \\(9, "
        ):
            handle.encode_images(inputs["pixel_values"], num_patches=[1, 3, 4])
        broken = dict(inputs, input_ids=inputs["input_ids"].clone())
        broken["input_ids"][0, -3] = 99  # one more placeholder after the first image
        with pytest.raises(PrumergeError, match="not multiples of the 16 tokens of a tile"):
            generate(model, broken, max_new_tokens=1)


def test_an_image_budget_is_split_over_its_tiles(model):
    inputs = build_batch(CASE, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=10) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [10, 10, 10]
        # 1 tile: 10; 3 tiles: 4 + 3 + 3; 5 tiles: 2 each.
        assert tile_lengths(handle) == sorted([10, 4, 3, 3, 2, 2, 2, 2, 2])
    with prumerge.apply(model, "cls_topk", keep=3, budget_per="view") as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [3, 9, 15]
    with prumerge.apply(model, "cls_topk", keep=2) as handle:
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [2, 3, 5]  # at least one token per tile


def test_an_untouched_image_keeps_the_models_layout_next_to_a_reduced_one(model):
    inputs = build_batch(CASE, model, ROWS)
    with torch.no_grad():
        own = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    with prumerge.apply(model, "cls_topk", keep=16) as handle:
        features = handle.encode_images(inputs["pixel_values"], num_patches=INTERNVL_TILES)
    assert [f.shape[0] for f in features] == [16, 16, 16]
    assert torch.equal(features[0], own[0])  # one tile of 16: nothing removed, exactly


def reference_attention(model, pixel_values):
    """Per tile, the last layer's mean attention received and [CLS] attention per patch,
    and its keys, each averaged over the 2x2 patch groups the pixel shuffle makes, by hand:
    the groups come from the patch grid here, not from the model's pixel_shuffle."""
    layer = model.model.vision_tower.encoder.layer[-1]
    attention = layer.attention
    seen = {}
    hook = attention.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(
            hidden=kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        model.model.vision_tower(pixel_values=pixel_values)
    hook.remove()
    hidden = seen["hidden"]  # (T, 1 + N, C), after the layer's first norm
    q = attention.q_norm(attention.q_proj(hidden))
    k = attention.k_norm(attention.k_proj(hidden))
    tiles, length, width = q.shape
    heads = attention.num_heads
    qh = q.view(tiles, length, heads, -1).transpose(1, 2)
    kh = k.view(tiles, length, heads, -1).transpose(1, 2)
    weights = (qh @ kh.transpose(-1, -2) * attention.scale).softmax(-1)  # (T, h, T', T')
    mean = weights.mean(dim=(1, 2))[:, 1:]  # received, over heads and every query
    cls = weights[:, :, 0].mean(dim=1)[:, 1:]
    side = round((length - 1) ** 0.5)

    def groups(per_patch):  # (T, N, C) -> (T, N / 4, C), 2x2 blocks in raster order
        grid = per_patch.reshape(tiles, side // 2, 2, side // 2, 2, -1)
        return grid.mean(dim=(2, 4)).reshape(tiles, -1, per_patch.shape[-1])

    return groups(mean[..., None])[..., 0], groups(cls[..., None])[..., 0], groups(k[:, 1:])


@pytest.mark.parametrize("importance", ["mean", "cls"])
def test_importance_and_keys_are_pooled_over_the_pixel_shuffle_groups(model, importance):
    inputs = CASE.images([0, 1, 2], seed=4)
    mean, cls, keys = reference_attention(model, inputs["pixel_values"])
    seen = []
    with prumerge.apply(model, "prumerge", keep=1.0, importance=importance) as handle:
        original = handle.method.reduce
        handle.method.reduce = lambda batch: seen.append(batch) or original(batch)
        handle.encode_images(inputs["pixel_values"], num_patches=INTERNVL_TILES)
    (batch,) = seen  # every tile keeps all 16: one budget, one batch of the 9 tiles
    torch.testing.assert_close(batch.cls_attn, mean if importance == "mean" else cls)
    torch.testing.assert_close(batch.keys, keys, rtol=1e-5, atol=1e-6)
    assert batch.grid == (4, 4) and batch.features.shape == (9, 16, 4 * 32)
    # The tokens are the pixel shuffle's: a token's channels are its group's four patches.
    with torch.no_grad():
        patches = model.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
    # (tile, group row, row in group, group col, col in group, C) -> groups, then patches.
    grid = patches[:, 1:].reshape(9, 4, 2, 4, 2, 32).permute(0, 1, 3, 2, 4, 5)
    torch.testing.assert_close(batch.features.view(9, 16, 2, 2, 32), grid.reshape(9, 16, 2, 2, 32))


def test_mean_is_the_default_importance(model):
    with prumerge.apply(model, "prumerge") as handle:
        assert handle.adapter.importance == "mean"
    with prumerge.apply(model, "prumerge", importance="cls") as handle:
        assert handle.adapter.importance == "cls"


def test_tome_merges_after_the_tower_and_refuses_to_merge_inside(model):
    with pytest.raises(PrumergeError, match="pixel shuffle needs every 2x2 patch group"):
        prumerge.apply(model, "tome", keep=4, where="tower")
    inputs = build_batch(CASE, model, ROWS)
    with prumerge.apply(model, "tome", keep=0.25) as handle:  # where="auto"
        generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [4, 12, 20]
