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


def test_hiprune_is_refused_on_qwen2_5_vl_in_one_line():
    model = CASES["qwen2_5_vl"].build("sdpa", 0)
    with pytest.raises(PrumergeError, match="two vision-tower layers") as info:
        prumerge.apply(model, "hiprune", keep=0.5)
    assert "\n" not in str(info.value)


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
