"""Position ids under reduction: compact (today's), original (1-D RoPE), and Qwen's M-RoPE."""

import pytest
import torch

import prumerge

from .conftest import IMAGE_TOKEN
from .families import CASES, build_batch
from .test_families import ROWS, generate, model_inputs


def record_positions(model):
    """Position ids of every language-model call, recorded by a scoped pre-hook."""
    seen = []

    def hook(_module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_original_positions_on_llava():
    case = CASES["llava"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    unreduced = (mask.cumsum(1) - 1).clamp(min=0)
    with prumerge.apply(model, "cls_topk", keep=5, positions="original") as handle:
        prepared = handle.prepare_inputs(ids, inputs["pixel_values"], attention_mask=mask)
        kept = handle.last_reduction.index  # (3, 5) patches kept, raster order
        seen, hook = record_positions(model)
        generate(model, inputs, max_new_tokens=3)
        hook.remove()
    positions = prepared["position_ids"]
    new_ids = prepared["input_ids"]
    for row in range(3):
        first = int((ids[row] == IMAGE_TOKEN).nonzero()[0])  # first placeholder, input
        slots = (new_ids[row] == IMAGE_TOKEN).nonzero().flatten()
        # Each kept patch keeps the position its own placeholder had.
        assert positions[row, slots].tolist() == (unreduced[row, first] + kept[row]).tolist()
        # The text after the image continues as it would without reduction.
        after = new_ids[row, slots[-1] + 1 :]
        assert positions[row, slots[-1] + 1 :].tolist() == unreduced[row, -len(after) :].tolist()
    # Decoding continues after the unreduced prompt's last position.
    assert seen[1][:, -1].tolist() == (unreduced[:, -1] + 1).tolist()


def test_compact_positions_are_consecutive_on_llava():
    case = CASES["llava"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        seen, hook = record_positions(model)
        generate(model, inputs, max_new_tokens=2)
        hook.remove()
        prepared = handle.prepare_inputs(
            inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"]
        )
    mask = prepared["attention_mask"]
    assert prepared["position_ids"] is None  # the model counts them from the mask
    assert seen[0][:, -1].tolist() == (mask.sum(1) - 1).tolist()


def test_given_position_ids_keep_their_gaps_with_original_positions():
    case = CASES["llava"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    given = (mask.cumsum(1) - 1).clamp(min=0) + 100  # any positions the caller chose
    with prumerge.apply(model, "none", positions="original") as handle:
        same = handle.prepare_inputs(ids, inputs["pixel_values"], mask, position_ids=given)
    valid = same["attention_mask"].bool()
    assert torch.equal(same["position_ids"][valid], given[mask.bool()])
    with prumerge.apply(model, "random", keep=4, positions="original") as handle:
        cut = handle.prepare_inputs(ids, inputs["pixel_values"], mask, position_ids=given)
    # The last token keeps its given position: the gap the cut left is not closed.
    assert cut["position_ids"][:, -1].tolist() == given[:, -1].tolist()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_kept_tokens_keep_their_original_3d_rope_indices(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    original, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=mask,
    )  # (3, B, L)
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        prepared = handle.prepare_inputs(
            ids,
            inputs["pixel_values"],
            attention_mask=mask,
            image_grid_thw=inputs["image_grid_thw"],
        )
        reductions = handle.last_reductions
        seen, hook = record_positions(model)
        out = generate(model, inputs, max_new_tokens=3)
        hook.remove()
    # Which merger group each kept token of each image is (images of a shape go together).
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    kept_groups, order = {}, list(dict.fromkeys(grids))
    for shape, reduction in zip(order, reductions, strict=True):
        members = [i for i, g in enumerate(grids) if g == shape]
        for i, row in zip(members, reduction.index, strict=True):
            kept_groups[i] = row
    positions, new_ids = prepared["position_ids"], prepared["input_ids"]
    for row in range(3):
        first = int((ids[row] == IMAGE_TOKEN).nonzero()[0])
        slots = (new_ids[row] == IMAGE_TOKEN).nonzero().flatten()
        expected = original[:, row, first + kept_groups[row]]  # (3, 5)
        assert torch.equal(positions[:, row, slots], expected)
        text = new_ids[row, slots[-1] + 1 :].shape[0]
        assert torch.equal(positions[:, row, -text:], original[:, row, -text:])
    # Decoding continues from the unreduced prompt's last index, on all three axes.
    assert torch.equal(seen[1][:, :, -1], original[:, :, -1] + 1)
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl"])
def test_original_positions_survive_beam_search_and_several_sequences(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "prumerge", keep=6, positions="original"):
        beams = generate(model, inputs, num_beams=2, num_return_sequences=2)
        cached = generate(model, inputs, num_beams=2, num_return_sequences=2, use_cache=False)
    assert beams.shape[0] == 6 and torch.equal(beams, cached)
    assert torch.equal(beams[::2, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert model_inputs(inputs)  # inputs untouched
