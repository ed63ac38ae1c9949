"""Gemma 3: each reduced image attends to itself both ways, exactly as the model's own mask
over its full image; importance pooled over the projector's pooling windows."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .families import CASES, IMAGE_TOKEN, build_batch
from .test_families import MULTI, ROWS, logits, model_inputs

CASE = CASES["gemma3"]


@pytest.fixture(scope="module")
def model():
    return CASE.build("sdpa", 0)


def hand_mask(attention_mask, token_types, window, bidirectional=True):
    """(B, 1, L, L) boolean masks written out: causal, plus every image run attending to
    itself both ways; the sliding layers' also keep keys within the window behind."""
    valid = attention_mask.bool()
    is_image = token_types == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    block = torch.where(is_image, starts.long().cumsum(1), -1)  # run number, -1 for text
    length = valid.shape[1]
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    allowed = (k <= q)[None] | (
        bidirectional & (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    )
    allowed = allowed & valid[:, None, :]
    sliding = allowed & (k > q - window)[None]
    alone = torch.eye(length, dtype=torch.bool)[None] & ~valid[:, :, None]  # padding queries
    return (allowed | alone)[:, None], (sliding | alone)[:, None]


def decoder_logits(model, prepared, full, sliding):
    with torch.no_grad():
        hidden = model.model.language_model(
            inputs_embeds=prepared["inputs_embeds"],
            attention_mask={"full_attention": full, "sliding_attention": sliding},
            position_ids=prepared["position_ids"],
        ).last_hidden_state
        return model.lm_head(hidden)


@pytest.mark.parametrize("rows", [ROWS, MULTI], ids=["one-image", "two-images"])
def test_a_reduced_image_attends_to_its_kept_tokens_both_ways(model, rows):
    inputs = build_batch(CASE, model, rows)
    window = model.config.text_config.sliding_window
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        got = logits(model, inputs)  # the patched forward: the model builds its own mask
        images = {k: v for k, v in model_inputs(inputs).items() if k != "input_ids"}
        prepared = handle.prepare_inputs(inputs["input_ids"], **images)
    mask, types = prepared["attention_mask"], prepared["token_type_ids"]
    assert torch.equal(types, (prepared["input_ids"] == IMAGE_TOKEN).long() * mask)
    assert (types.sum(1) == 5 * torch.tensor([len(kinds) for _, kinds in rows])).all()
    valid = mask.bool()
    expected = decoder_logits(model, prepared, *hand_mask(mask, types, window))
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    # The test can fail: a causal mask over the image tokens gives other logits.
    causal = decoder_logits(model, prepared, *hand_mask(mask, types, window, False))
    assert not torch.allclose(got[valid], causal[valid], atol=1e-3)


def test_without_token_type_ids_the_image_is_causal_as_in_the_unpatched_model(model):
    inputs = model_inputs(build_batch(CASE, model, ROWS))
    inputs.pop("token_type_ids")
    with torch.no_grad():
        expected = model(**inputs).logits
    with prumerge.apply(model, "none") as handle:
        with torch.no_grad():
            got = model(**inputs).logits
        images = {k: v for k, v in inputs.items() if k != "input_ids"}
        assert "token_type_ids" not in handle.prepare_inputs(inputs["input_ids"], **images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_importance_and_keys_are_pooled_over_the_projectors_windows(model):
    pixels = CASE.images([0, 1, 2], seed=5)["pixel_values"]
    attention = model.model.vision_tower.encoder.layers[-1].self_attn
    seen = {}
    hook = attention.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(
            hidden=kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        model.model.vision_tower(pixel_values=pixels)
    hook.remove()
    hidden = seen["hidden"]  # (I, 64, C)
    q, k = attention.q_proj(hidden), attention.k_proj(hidden)
    images, length, _ = q.shape
    heads = attention.num_heads
    qh = q.view(images, length, heads, -1).transpose(1, 2)
    kh = k.view(images, length, heads, -1).transpose(1, 2)
    received = (qh @ kh.transpose(-1, -2) * attention.scale).softmax(-1).mean(dim=(1, 2))

    def windows(per_patch):  # (I, 64, C) -> (I, 16, C): 2x2 windows of the 8x8 grid
        grid = per_patch.reshape(images, 4, 2, 4, 2, -1)
        return grid.mean(dim=(2, 4)).reshape(images, 16, -1)

    batches = []
    with prumerge.apply(model, "prumerge", keep=1.0) as handle:
        original = handle.method.reduce
        handle.method.reduce = lambda batch: batches.append(batch) or original(batch)
        handle.encode_images(pixels)
    (batch,) = batches
    torch.testing.assert_close(batch.cls_attn, windows(received[..., None])[..., 0])
    torch.testing.assert_close(batch.keys, windows(k), rtol=1e-5, atol=1e-6)
    assert batch.grid == (4, 4) and handle.adapter.importance == "mean"


def test_tome_merges_after_the_tower_and_refuses_to_merge_inside(model):
    with pytest.raises(PrumergeError, match="projector pools the whole patch grid"):
        prumerge.apply(model, "tome", keep=4, where="tower")
    with prumerge.apply(model, "tome", keep=4) as handle:  # where="auto": after the tower
        handle.encode_images(CASE.images([0, 1], seed=1)["pixel_values"])
        assert [int(n) for n in handle.last_reduction.lengths] == [4, 4]
