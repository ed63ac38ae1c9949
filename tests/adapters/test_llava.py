import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig

import prumerge
from prumerge.errors import PrumergeError

from .conftest import PATCHES, images, left_pad, prompt, tiny_llava, varied_images

ROWS = [prompt([1, 2], [3, 4, 5]), prompt([7, 8, 9, 1, 2], [3, 4, 6]), prompt([5], [6, 7])]


def generate(model, ids, mask, pixels, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)


def test_per_image_counts_differ_and_match_each_image_alone(model):
    pixels = varied_images()
    ids, mask = left_pad(ROWS)
    with prumerge.apply(model, "prumerge") as handle:
        generate(model, ids, mask, pixels)
        together = handle.stats.tokens_out
        alone = []
        for i in range(3):
            one_ids, one_mask = left_pad([ROWS[i]])
            generate(model, one_ids, one_mask, pixels[i : i + 1])
            alone += handle.stats.tokens_out
    assert together == alone
    assert len(set(together)) > 1, together  # the images' attention differs, so do the counts
    assert handle.stats.tokens_in == [PATCHES]
    assert all(n < PATCHES for n in together)


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_batched_generate_rows_equal_rows_alone(model, method):
    pixels = varied_images()
    ids, mask = left_pad(ROWS)
    with prumerge.apply(model, method):
        batch = generate(model, ids, mask, pixels)
        for i, row in enumerate(ROWS):
            one_ids, one_mask = left_pad([row])
            alone = generate(model, one_ids, one_mask, pixels[i : i + 1])
            assert batch[i, ids.shape[1] :].tolist() == alone[0, one_ids.shape[1] :].tolist()
    # The prompt part of the output is the caller's own input_ids.
    assert torch.equal(batch[:, : ids.shape[1]], ids)


@pytest.mark.parametrize(
    ("method", "options"), [("none", {}), ("prumerge", {"keep": 36}), ("prumerge+", {"keep": 1.0})]
)
def test_parity_with_unpatched_model_when_nothing_is_removed(model, method, options):
    pixels = images(3, seed=2)
    ids, mask = left_pad(ROWS)
    expected = generate(model, ids, mask, pixels)
    with torch.no_grad():
        expected_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    with prumerge.apply(model, method, **options) as handle:
        got = generate(model, ids, mask, pixels)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert handle.stats.tokens_out == [PATCHES] * 3


def test_sampling_parity_under_a_seed(model):
    pixels = images(3, seed=3)
    ids, mask = left_pad(ROWS)
    torch.manual_seed(7)
    expected = generate(model, ids, mask, pixels, do_sample=True, top_k=20)
    with prumerge.apply(model, "none"):
        torch.manual_seed(7)
        got = generate(model, ids, mask, pixels, do_sample=True, top_k=20)
    assert torch.equal(got, expected)


def test_remove_restores_bit_identical_outputs(model):
    pixels = images(3, seed=4)
    ids, mask = left_pad(ROWS)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    handle = prumerge.apply(model, "prumerge+", keep=8)
    reduced = generate(model, ids, mask, pixels)
    handle.remove()
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(before, after)
    assert "forward" not in vars(model) and "generate" not in vars(model)
    assert reduced.shape[0] == 3
    handle.remove()  # idempotent


def test_kv_cache_and_no_cache_agree_with_reduction(model):
    pixels = images(3, seed=5)
    ids, mask = left_pad(ROWS)
    with prumerge.apply(model, "prumerge", keep=5):
        cached = generate(model, ids, mask, pixels, use_cache=True)
        uncached = generate(model, ids, mask, pixels, use_cache=False)
    assert torch.equal(cached, uncached)


def test_several_images_per_prompt(model):
    two = prompt([1, 2], [3], [4, 5])  # two images in one prompt
    ids, mask = left_pad([two, ROWS[0]])
    pixels = images(3, seed=6)
    with prumerge.apply(model, "prumerge", keep=4) as handle:
        batch = generate(model, ids, mask, pixels)
        alone_ids, alone_mask = left_pad([two])
        alone = generate(model, alone_ids, alone_mask, pixels[:2])
    assert handle.stats.tokens_out == [4, 4]
    assert batch[0, ids.shape[1] :].tolist() == alone[0, alone_ids.shape[1] :].tolist()


def test_forward_with_labels(model):
    pixels = images(3, seed=7)
    ids, mask = left_pad(ROWS)
    labels = torch.where((ids == 99) | (mask == 0), -100, ids)
    expected = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    with prumerge.apply(model, "none"):
        same = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    with prumerge.apply(model, "prumerge", keep=6):
        reduced = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        reduced.loss.backward()
    torch.testing.assert_close(same.loss, expected.loss)
    # The longest row keeps its text and 6 visual tokens: the sequence shrinks by N - 6.
    assert reduced.logits.shape[1] == ids.shape[1] - (PATCHES - 6)
    assert torch.isfinite(reduced.loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None


def _packed_row(prefix, blocks):
    """A prefix with the image, then blocks that each see the prefix and themselves only,
    at the positions they would have alone (ids, positions, segment of each token)."""
    ids, positions, segments = list(prefix), list(range(len(prefix))), [0] * len(prefix)
    for k, block in enumerate(blocks, start=1):
        ids += block
        positions += range(len(prefix), len(prefix) + len(block))
        segments += [k] * len(block)
    return ids, positions, segments


@pytest.mark.parametrize("method, options", [("prumerge", {"keep": 6}), ("prumerge+", {})])
def test_packed_rows_match_each_block_alone(model, method, options):
    # Two rows, two images; each row packs question blocks behind one shared image prefix,
    # as training packs the questions of one image. With a 4-D block mask and restarted
    # positions, every block must get exactly the logits it gets as a prompt of its own.
    pixels = images(2, seed=3)
    prefixes = [prompt([1, 2], []), prompt([5], [])]
    blocks = [[[3, 4, 5], [6, 7]], [[8, 9, 3, 2]]]
    rows = [_packed_row(p, b) for p, b in zip(prefixes, blocks, strict=True)]
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    pos = torch.zeros(2, width, dtype=torch.long)
    seg = torch.full((2, width), -1)
    for b, (i, p, g) in enumerate(rows):
        ids[b, : len(i)], pos[b, : len(p)], seg[b, : len(g)] = (torch.tensor(x) for x in (i, p, g))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    key, query = seg[:, None, :], seg[:, :, None]
    mask = (causal & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)) | torch.eye(
        width, dtype=torch.bool
    )
    with torch.no_grad(), prumerge.apply(model, method, **options) as handle:
        packed = model(
            input_ids=ids, attention_mask=mask[:, None], position_ids=pos, pixel_values=pixels
        ).logits
        kept = handle.stats.tokens_out
        prepared = handle.prepare_inputs(
            ids, pixels, attention_mask=mask[:, None], position_ids=pos
        )
        for b in range(2):
            start = len(prefixes[b]) - (PATCHES - kept[b])  # where row b's blocks begin now
            for block in blocks[b]:
                alone_ids = torch.tensor([prefixes[b] + block])
                alone = model(input_ids=alone_ids, pixel_values=pixels[b : b + 1]).logits
                got = packed[b, start : start + len(block)]
                torch.testing.assert_close(got, alone[0, -len(block) :], atol=1e-5, rtol=1e-4)
                # Each block restarts right after the kept visual tokens.
                expected = torch.arange(
                    len(prefixes[b]) - (PATCHES - kept[b]), alone_ids.shape[1] - (PATCHES - kept[b])
                )
                assert (
                    prepared["position_ids"][b, start : start + len(block)].tolist()
                    == expected[-len(block) :].tolist()
                )
                start += len(block)
    assert min(kept) < PATCHES


def test_given_position_ids_equal_counted_ones_under_reduction(model):
    pixels = images(3, seed=5)
    ids = torch.tensor(
        [prompt([1, 2], [3, 4, 5]), prompt([7, 8], [9, 1, 2]), prompt([5, 6], [6, 7, 3])]
    )
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad(), prumerge.apply(model, "prumerge", keep=5):
        counted = model(input_ids=ids, pixel_values=pixels).logits
        given = model(input_ids=ids, pixel_values=pixels, position_ids=positions).logits
    torch.testing.assert_close(given, counted)


def test_two_models_side_by_side_stay_independent():
    first, second = tiny_llava("clip", seed=0), tiny_llava("clip", seed=0)
    pixels = images(3, seed=8)
    ids, mask = left_pad(ROWS)
    expected = generate(second, ids, mask, pixels)
    with prumerge.apply(first, "prumerge", keep=3) as handle:
        generate(first, ids, mask, pixels)
        assert torch.equal(generate(second, ids, mask, pixels), expected)
    assert handle.stats.tokens_out == [3, 3, 3]
    assert "generate" not in vars(second)


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_same_result_under_eager_and_sdpa_vision_attention(tower):
    pixels = images(3, seed=9)
    ids, mask = left_pad(ROWS)
    outputs, counts = [], []
    for attn in ("eager", "sdpa"):
        model = tiny_llava(tower, attn=attn, seed=1)
        with prumerge.apply(model, "prumerge") as handle:
            outputs.append(generate(model, ids, mask, pixels))
            counts.append(handle.stats.tokens_out)
    assert torch.equal(outputs[0], outputs[1])
    assert counts[0] == counts[1]


def test_attention_capture_matches_eager_attention_weights():
    model = tiny_llava("clip", attn="eager")
    pixels = images(2, seed=10)
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pixels, output_attentions=True, output_hidden_states=True)
    expected = out.attentions[-1].mean(dim=1)[:, 0, 1:]  # layer consuming hidden_states[-2]
    with prumerge.apply(model, "prumerge", keep=1.0) as handle:
        seen = {}
        original = handle.method.reduce
        handle.method.reduce = lambda inputs: (
            seen.setdefault("attn", inputs.cls_attn) is not None and original(inputs)
        )
        handle.encode_images(pixels)
    torch.testing.assert_close(seen["attn"], expected, rtol=1e-5, atol=1e-6)


def test_unsupported_model_class():
    llm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=10,
        )
    )
    with pytest.raises(
        PrumergeError,
        match="LlamaForCausalLM is not supported; supported models: LlavaForConditionalGeneration",
    ):
        prumerge.apply(llm)


def test_tower_without_cls_token_needs_the_full_strategy():
    model = tiny_llava("clip")
    config = model.config
    config.vision_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=42,
        patch_size=7,
    )
    from transformers import SiglipVisionModel

    model.model.vision_tower = SiglipVisionModel(config.vision_config)
    with pytest.raises(PrumergeError, match="SigLIP has no \\[CLS\\] token; supported: 'full'"):
        prumerge.apply(model)
    config.vision_feature_select_strategy = "full"
    with pytest.raises(PrumergeError, match="importance='cls' needs a \\[CLS\\] token"):
        prumerge.apply(model, "prumerge", importance="cls")
    with prumerge.apply(model, "prumerge") as handle:  # importance="mean" is chosen
        assert handle.adapter.tower.importance == "mean"


def test_unsupported_tower():
    from transformers import ViTConfig, ViTModel

    model = tiny_llava("clip")
    model.model.vision_tower = ViTModel(
        ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(PrumergeError, match="ViTModel is not supported; supported: CLIP.*SigLIP"):
        prumerge.apply(model)


def test_image_count_mismatch():
    model = tiny_llava("clip")
    ids, mask = left_pad(ROWS)
    with (
        prumerge.apply(model),
        pytest.raises(PrumergeError, match="placeholders for 3 image.*2 image"),
    ):
        generate(model, ids, mask, images(2))
    bad = torch.tensor([[1] + [99] * 10 + [2]])
    with prumerge.apply(model), pytest.raises(PrumergeError, match="not a multiple of the 36"):
        generate(model, bad, torch.ones_like(bad), images(1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"vision_feature_select_strategy": "full"},
            "vision_feature_select_strategy='full' is not handled",
        ),
        ({"vision_feature_layer": [-2, -3]}, r"vision_feature_layer=\[-2, -3\] is not handled"),
        ({"vision_feature_layer": -1}, "no encoder layer consumes it"),
        ({"vision_feature_layer": 9}, "out of range"),
    ],
)
def test_unhandled_feature_settings(overrides, message):
    model = tiny_llava("clip")
    for key, value in overrides.items():
        setattr(model.config, key, value)
    with pytest.raises(PrumergeError, match=message):
        prumerge.apply(model)


def test_unknown_method_and_option():
    model = tiny_llava("clip")
    with pytest.raises(PrumergeError, match="unknown method 'fast'; available: .*prumerge"):
        prumerge.apply(model, "fast")
    with pytest.raises(PrumergeError, match="does not take option"):
        prumerge.apply(model, "prumerge", ratio=0.3)


def test_apply_twice_is_refused():
    model = tiny_llava("clip")
    with prumerge.apply(model), pytest.raises(PrumergeError, match="already patched"):
        prumerge.apply(model)


def test_visionzip_reads_the_layer_that_produces_the_features():
    model = tiny_llava("clip", attn="eager")
    pixels = images(2, seed=11)
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
    # 3 layers, vision_feature_layer=-2: layer 1 produces the features, layer 2 consumes them.
    produced = out.attentions[1].mean(dim=1)[:, 0, 1:]
    consumed = out.attentions[2].mean(dim=1)[:, 0, 1:]
    for method, expected in (("visionzip", produced), ("prumerge", consumed)):
        with prumerge.apply(model, method, keep=1.0) as handle:
            seen = {}
            original = handle.method.reduce

            def spy(inputs, original=original, seen=seen):
                seen["attn"] = inputs.cls_attn
                return original(inputs)

            handle.method.reduce = spy
            handle.encode_images(pixels)
        torch.testing.assert_close(seen["attn"], expected, rtol=1e-5, atol=1e-6)


def test_downsample_runs_the_tower_on_a_resized_image(model):
    pixels = images(3, seed=12)
    ids, mask = left_pad(ROWS)
    seen = []
    hook = model.model.vision_tower.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0].shape, kwargs)), with_kwargs=True
    )
    with prumerge.apply(model, "downsample", keep=9) as handle:
        cached = generate(model, ids, mask, pixels)
        uncached = generate(model, ids, mask, pixels, use_cache=False)
    hook.remove()
    assert handle.stats.tokens_out == [9, 9, 9] and handle.stats.tokens_in == [PATCHES] * 3
    assert seen[0][0][-2:] == (21, 21)  # a 3x3 grid of 7-px patches instead of 6x6
    if type(model.model.vision_tower).__name__ == "CLIPVisionModel":
        assert seen[0][1]["interpolate_pos_encoding"] is True
    assert torch.equal(cached, uncached)
