"""Qwen2.5-VL, Qwen2-VL and Qwen3-VL: importance after the PatchMerger, in raster order; downsample."""

import inspect

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .families import CASES, build_batch
from .test_families import ROWS, generate


def reference_importance(model, pixel_values, grid):
    """Mean attention received per merger group, from the block's own inputs, by hand.

    The raster order of the groups is recovered from the data: the merger's rows (window
    order) are matched to the model's output rows (raster order).
    """
    visual = model.model.visual
    vision = model.config.vision_config
    full = list(getattr(vision, "fullatt_block_indexes", None) or [len(visual.blocks) - 1])
    attention = visual.blocks[full[-1]].attn
    rotary = inspect.getmodule(type(attention)).apply_rotary_pos_emb_vision
    seen = {}

    def pre(_module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rope"] = kwargs["position_embeddings"]

    def merged(_module, _args, output):
        seen["merger"] = output

    hooks = [
        attention.register_forward_pre_hook(pre, with_kwargs=True),
        visual.merger.register_forward_hook(merged),
    ]
    with torch.no_grad():
        out = visual(pixel_values, grid_thw=grid).pooler_output
    for hook in hooks:
        hook.remove()
    hidden = seen["hidden"]
    heads = attention.num_heads
    q, k, _ = attention.qkv(hidden).reshape(hidden.shape[0], 3, heads, -1).unbind(1)
    q, k = rotary(q, k, *seen["rope"])
    # Raster position of every merger row: the output row holding the same values.
    raster = torch.cdist(seen["merger"], out).argmin(dim=1)
    results, start, group_start = [], 0, 0
    for size in grid.prod(-1).tolist():
        qi, ki = q[start : start + size].float(), k[start : start + size].float()  # (T, h, D)
        logits = torch.einsum("qhd,khd->hqk", qi, ki) * qi.shape[-1] ** -0.5
        received = logits.softmax(-1).mean(dim=(0, 1))  # (T,)
        groups = size // 4
        pooled = received.view(groups, 4).mean(1)
        order = raster[group_start : group_start + groups] - group_start
        results.append(torch.empty_like(pooled).index_copy_(0, order, pooled))
        start += size
        group_start += groups
    return results


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_importance_is_pooled_mean_attention_in_raster_order(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = case.images([0, 1, 2], seed=3)
    expected = reference_importance(model, inputs["pixel_values"], inputs["image_grid_thw"])
    seen = []
    with prumerge.apply(model, "prumerge", keep=1.0) as handle:
        original = handle.method.reduce

        def spy(batch):
            seen.append(batch)
            return original(batch)

        handle.method.reduce = spy
        handle.encode_images(**inputs)
    got = [row for batch in seen for row in batch.cls_attn]  # one grid shape per batch
    assert len(got) == 3  # three shapes, so one image per batch, in image order
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert seen[0].grid == (4, 6) and seen[0].keys.shape == (1, 24, 32)


def test_windowed_blocks_see_a_permuted_order():
    # Makes the raster-order test meaningful: in this config the window order is not raster.
    case = CASES["qwen2_5_vl"]
    model = case.build("sdpa", 0)
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        torch.tensor([[1, 8, 12]]), spatial_merge_size=2, window_size=16, patch_size=4
    )
    assert not torch.equal(index, torch.arange(24))
    assert model.config.vision_config.window_size == 16


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_downsample_runs_the_tower_on_smaller_images(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "downsample", keep=6) as handle:
        out = generate(model, inputs)
        cached = generate(model, inputs, use_cache=False)
    # Merged grids 4x6, 4x4, 6x4 -> pool's grids within 6 cells: 2x3, 2x3, 3x2.
    assert handle.stats.tokens_out == [6, 6, 6]
    assert handle.stats.tokens_in == inputs["counts"]
    assert torch.equal(out, cached)


@pytest.mark.parametrize("method", ["vispruner", "cdpruner"])
def test_the_issue_25_vision_methods_apply_to_a_tiny_qwen2_5_vl(method):
    case = CASES["qwen2_5_vl"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, method, keep=0.5) as handle:
        out = generate(model, inputs, max_new_tokens=2)
        assert handle.stats.tokens_out == [round(0.5 * n) for n in inputs["counts"]]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_hiprune_is_refused_on_qwen3_vl_in_one_line():
    model = CASES["qwen3_vl"].build("sdpa", 0)
    with pytest.raises(PrumergeError, match="two vision-tower layers") as info:
        prumerge.apply(model, "hiprune", keep=0.5)
    assert "\n" not in str(info.value)


def release_global_attention(model, pixel_values, grid, block_index):
    """HiPrune's Qwen2.5-VL "global attention" of one ViT block, as its release computes it
    (Danielement321/HiPrune at 6e83a12, ``Qwen2_5_VL/qwen2_5_vl_HiPrune.py``: every block
    returns its softmax map under its own mask, full per image or within windows; mean over
    heads, SUM over queries, mean over each merger group of 4, ``reverse_indices`` back to
    raster order), per image."""
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    vision = model.config.vision_config
    attention = visual.blocks[block_index].attn
    rotary = inspect.getmodule(type(attention)).apply_rotary_pos_emb_vision
    seen = {}

    def pre(_module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["rope"] = kwargs["position_embeddings"]

    hook = attention.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        visual(pixel_values, grid_thw=grid)
    hook.remove()
    hidden = seen["hidden"]
    total = hidden.shape[0]
    q, k, _ = attention.qkv(hidden).reshape(total, 3, attention.num_heads, -1).unbind(1)
    q, k = rotary(q, k, *seen["rope"])
    full = getattr(vision, "fullatt_block_indexes", None)
    window_index = None
    bounds = [0, *grid.prod(-1).cumsum(0).tolist()]  # full blocks: each image alone
    if full is not None:  # Qwen2.5-VL: every block sees the tokens in window order
        window_index, windows = get_vision_window_index(
            grid, spatial_merge_size=2, window_size=vision.window_size, patch_size=4
        )
        if block_index not in full:
            bounds = sorted({int(b) for b in windows})
    mask = torch.full((total, total), float("-inf"))
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        mask[a:b, a:b] = 0
    logits = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    weights = (logits + mask).softmax(-1).mean(0).sum(0)  # heads mean, queries sum: (T,)
    pooled = weights.view(total // 4, 4).mean(-1)  # per merger group, in the blocks' order
    if window_index is not None:
        pooled = pooled[torch.argsort(window_index)]  # reverse_indices: raster order
    return list(torch.split(pooled, (grid.prod(-1) // 4).tolist()))


@pytest.mark.parametrize(
    ("family", "layer"), [("qwen2_5_vl", 1), ("qwen2_5_vl", 2), ("qwen2_vl", 1)]
)
def test_hiprune_anchors_read_the_object_blocks_attention_as_the_release(family, layer):
    # The tiny Qwen2.5-VL's block 0 attends within windows, block 1 fully.
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = case.images([0, 1, 2], seed=3)
    seen = []
    with prumerge.apply(model, "hiprune", keep=6, alpha=5 / 6, object_layer=layer) as handle:
        reduce = handle.method.reduce
        handle.method.reduce = lambda batch: seen.append(batch) or reduce(batch)
        out = handle.encode_images(**inputs)
    assert [f.shape[0] for f in out] == [6, 6, 6]
    expected = release_global_attention(
        model, inputs["pixel_values"], inputs["image_grid_thw"], layer - 1
    )
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    got = [row for batch in seen for row in batch.object_importance]  # one image per batch
    for g, e, size in zip(got, expected, sizes, strict=True):
        # prumerge's mean over the image's queries is the release's sum over its size
        torch.testing.assert_close(g * size, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("dart", {"keep": 0.5}),
        ("pdrop", {"layers": (1, 2)}),
        ("sparsevlm", {"keep": 0.3, "layers": "0,1"}),
    ],
)
def test_the_issue_25_llm_methods_keep_the_m_rope_positions_on_a_tiny_qwen2_5_vl(method, options):
    # The last decoder layer must see every kept token with the rotary embedding of its own
    # original 3-D position: the unpatched model's, at the kept prompt positions.
    case = CASES["qwen2_5_vl"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    last = model.model.language_model.layers[-1].self_attn
    seen = []
    hook = last.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_embeddings"][0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "counts"})
            full = seen.pop()  # (B, L, D)
            with prumerge.apply(model, method, **options) as handle:
                handle.fastv.disarm = lambda: None  # keep the call's state for inspection
                model(**{k: v for k, v in inputs.items() if k != "counts"})
                dropped = handle.fastv.call.dropped
                pruned = seen.pop()  # (B, L', D)
                out = generate(model, inputs, max_new_tokens=2)
    finally:
        hook.remove()
    assert all(n < m for n, m in zip(handle.stats.tokens_out, inputs["counts"], strict=True))
    mask = inputs["attention_mask"].bool()
    for row in range(full.shape[0]):
        kept = ((~dropped[row]) & mask[row]).nonzero().flatten()
        torch.testing.assert_close(pruned[row, -kept.shape[0] :], full[row, kept])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
