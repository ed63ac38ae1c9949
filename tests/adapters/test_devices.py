"""Device maps (accelerate dispatch with offload), half precision, and register towers."""

import pytest
import torch
from accelerate import dispatch_model
from transformers import Dinov2WithRegistersConfig, LlamaConfig, LlavaConfig

import prumerge

from .conftest import IMAGE_SIZE, IMAGE_TOKEN
from .families import CASES, build_batch
from .test_families import FAMILY, ROWS, generate, model_inputs

# The language model split between the CPU and disk offload: offloaded weights sit on the
# meta device, and accelerate's hooks bring them in for each call.
DEVICE_MAP = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "disk",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "disk",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.mark.parametrize(("method", "options"), [("prumerge", {"keep": 6}), ("fastv", {"keep": 5})])
def test_remove_restores_accelerate_hooks_on_an_offloaded_model(tmp_path, method, options):
    case = CASES["llava"]
    plain = case.build("sdpa", 0)
    inputs = build_batch(case, plain, ROWS)
    with prumerge.apply(plain, method, **options):
        expected = generate(plain, inputs)
    unreduced = generate(plain, inputs)
    model = dispatch_model(case.build("sdpa", 0), device_map=DEVICE_MAP, offload_dir=tmp_path)
    assert model.model.language_model.embed_tokens.weight.device.type == "meta"
    hooked = dict(vars(model))["forward"]  # accelerate's hooked forward
    layer_forwards = [vars(layer).get("forward") for layer in model.model.language_model.layers]
    assert all(f is not None for f in layer_forwards[1:])  # offloaded layers are hooked too
    with prumerge.apply(model, method, **options) as handle:
        got = generate(model, inputs)
    assert torch.equal(got, expected)
    assert handle.stats.tokens_out == [options["keep"]] * 3
    assert vars(model)["forward"] is hooked
    assert [vars(layer).get("forward") for layer in model.model.language_model.layers] == (
        layer_forwards
    )
    assert torch.equal(generate(model, inputs), unreduced)


@FAMILY
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(family, dtype):
    case = CASES[family]
    model = case.build("sdpa", 0).to(dtype)
    inputs = build_batch(case, model, ROWS)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    expected = generate(model, inputs)
    with prumerge.apply(model, "none"):
        assert torch.equal(generate(model, inputs), expected)
    with prumerge.apply(model, "prumerge+", keep=0.3) as handle:
        reduced = generate(model, inputs)
        embeds = handle.prepare_inputs(
            inputs["input_ids"],
            **{k: v for k, v in model_inputs(inputs).items() if k != "input_ids"},
        )["inputs_embeds"]
    assert handle.stats.tokens_out == [round(0.3 * n) for n in inputs["counts"]]
    assert embeds.dtype == dtype and torch.isfinite(embeds.float()).all()
    assert reduced.shape[1] == inputs["input_ids"].shape[1] + 5


def _registers_llava(attn="sdpa"):
    vision = Dinov2WithRegistersConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=7,
        num_register_tokens=2,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2
    )
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def test_dinov2_with_registers_sends_its_registers_unreduced():
    model = _registers_llava()
    case = CASES["llava"]
    inputs = build_batch(case, model, ROWS)
    assert inputs["counts"] == [2 + 36] * 3  # the model keeps the registers as tokens
    expected = generate(model, inputs)
    with prumerge.apply(model, "prumerge", keep=1.0):
        assert torch.equal(generate(model, inputs), expected)
    with prumerge.apply(model, "cls_topk", keep=5) as handle:
        reduced = generate(model, inputs)
        features = handle.encode_images(inputs["pixel_values"])
    assert handle.stats.tokens_out == [2 + 5] * 3  # registers, then the kept patches
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        registers = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:3])
    torch.testing.assert_close(torch.stack([f[:2] for f in features]), registers)
    assert reduced.shape == expected.shape
