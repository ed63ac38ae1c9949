import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .conftest import IMAGE_TOKEN, PATCHES, images, left_pad, prompt, tiny_llava

ROWS = [prompt([1, 2], [3, 4, 5]), prompt([7, 8, 9, 1, 2], [3, 4, 6]), prompt([5], [6, 7])]


def generate(model, ids, mask, pixels, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixels,
            max_new_tokens=6,
            do_sample=False,
            **kwargs,
        )


@pytest.fixture(params=["sdpa", "eager"])
def model(request):
    model = tiny_llava("clip", text_layers=4)
    model.model.language_model.set_attn_implementation(request.param)
    return model


def test_kv_cache_and_no_cache_generate_the_same(model):
    ids, mask = left_pad(ROWS)
    pixels = images(3)
    with prumerge.apply(model, "fastv", keep=6, layer=2) as handle:
        cached = generate(model, ids, mask, pixels)
        uncached = generate(model, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached, uncached)
    assert handle.stats.tokens_out == [6, 6, 6] and handle.stats.llm_full_layers == 2


def test_rows_equal_rows_alone_and_later_layers_run_shorter(model):
    ids, mask = left_pad(ROWS)
    pixels = images(3, seed=1)
    lengths = {}

    def record(index):
        def hook(_module, _args, output):
            lengths.setdefault(index, output.shape[1])

        return hook

    hooks = [
        layer.register_forward_hook(record(i))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    with prumerge.apply(model, "fastv", keep=5, layer=2):
        batch = generate(model, ids, mask, pixels)
        for hook in hooks:
            hook.remove()
        for i, row in enumerate(ROWS):
            one_ids, one_mask = left_pad([row])
            alone = generate(model, one_ids, one_mask, pixels[i : i + 1])
            assert batch[i, ids.shape[1] :].tolist() == alone[0, one_ids.shape[1] :].tolist()
    full = ids.shape[1]
    assert lengths == {0: full, 1: full, 2: full - (PATCHES - 5), 3: full - (PATCHES - 5)}


def test_keeps_the_tokens_the_last_token_attends_to_most():
    model = tiny_llava("clip", attn="eager", text_layers=3)
    model.model.language_model.set_attn_implementation("eager")
    ids, mask = left_pad(ROWS[:2])
    pixels = images(2, seed=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True)
    received = out.attentions[1][:, :, -1, :].mean(dim=1)  # layer K-1 = 1, last query
    with prumerge.apply(model, "fastv", keep=7, layer=2) as handle:
        patch = handle.fastv
        patch.disarm = lambda: None  # keep the call's state for inspection
        generate(model, ids, mask, pixels)
        dropped = patch.call.dropped
    for row in range(2):
        positions = (ids[row] == IMAGE_TOKEN).nonzero().flatten()
        expected = positions[received[row, positions].topk(7).indices].sort().values
        kept = positions[~dropped[row, positions]]
        assert kept.tolist() == expected.tolist()


def test_full_budget_gives_parity(model):
    ids, mask = left_pad(ROWS)
    pixels = images(3, seed=3)
    expected = generate(model, ids, mask, pixels)
    with prumerge.apply(model, "fastv", keep=PATCHES, layer=2):
        assert torch.equal(generate(model, ids, mask, pixels), expected)


def test_remove_restores_layers(model):
    ids, mask = left_pad(ROWS)
    pixels = images(3, seed=4)
    expected = generate(model, ids, mask, pixels)
    with prumerge.apply(model, "fastv", keep=3, layer=1):
        generate(model, ids, mask, pixels)
    assert all("forward" not in vars(layer) for layer in model.model.language_model.layers)
    assert torch.equal(generate(model, ids, mask, pixels), expected)


def test_bad_settings():
    model = tiny_llava("clip", text_layers=2)
    with pytest.raises(PrumergeError, match="layer K=2 must be in 1..1"):
        prumerge.apply(model, "fastv", layer=2)
    ids, mask = left_pad(ROWS)
    with prumerge.apply(model, "fastv", layer=1), pytest.raises(PrumergeError, match="labels"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(3), labels=ids)


def test_rows_with_different_image_counts_equal_rows_alone(model):
    # Row 0 has two images, row 1 one: the rows drop different numbers of tokens, so layers
    # >= K pad the shorter row; each row must still equal itself run alone.
    rows = [prompt([1], [2], [3]), ROWS[0]]
    ids, mask = left_pad(rows)
    pixels = images(3, seed=5)
    with prumerge.apply(model, "fastv", keep=4, layer=2) as handle:
        batch = generate(model, ids, mask, pixels)
        assert handle.stats.tokens_out == [4, 4, 4]
        cached = generate(model, ids, mask, pixels, use_cache=False)
        starts = [0, 2]
        for i, row in enumerate(rows):
            one_ids, one_mask = left_pad([row])
            count = 2 if i == 0 else 1
            alone = generate(model, one_ids, one_mask, pixels[starts[i] : starts[i] + count])
            assert batch[i, ids.shape[1] :].tolist() == alone[0, one_ids.shape[1] :].tolist()
    assert torch.equal(batch, cached)


def test_two_dimensional_masks_follow_the_kept_columns():
    # Flash attention hands the layers a (B, kv) padding mask instead of a 4-D one.
    from prumerge.adapters.stage_plan import plan_stage

    dropped = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = plan_stage(torch.zeros(2, 5, 4), {"attention_mask": padding.long()}, dropped, padding)
    cos = torch.arange(5.0)[None, :, None].expand(2, 5, 4)
    out = plan.apply({"attention_mask": padding.long(), "position_embeddings": (cos, cos)})
    # Row 0 keeps columns 0, 3, 4 and row 1 keeps 0, 1, 3, 4: row 0 starts with a blocked
    # column, and its extra query row copies its last real token (4).
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert plan.keep_rows.tolist() == [[4, 0, 3, 4], [0, 1, 3, 4]]
    assert out["position_embeddings"][0][:, :, 0].tolist() == [[4, 0, 3, 4], [0, 1, 3, 4]]
    # A decoding step: one new column, kept by every row.
    step = plan_stage(torch.zeros(2, 1, 4), {"attention_mask": torch.ones(2, 6)}, dropped, padding)
    assert step.keep_rows is None
    assert step.keep_columns.tolist() == [[6, 0, 3, 4, 5], [0, 1, 3, 4, 5]]
