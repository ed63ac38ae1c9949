"""ToMe inside the vision tower: the layer split, where it runs and where it is refused.

The merges themselves are checked against the released ToMe code in tests/release."""

import pytest
import torch

import prumerge
from prumerge.adapters.tome_tower import ToMeTower
from prumerge.errors import PrumergeError
from prumerge.methods import TowerMerge, build_method

from .conftest import images, tiny_llava
from .families import CASES


def _layers(tower):
    encoder = tower.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patched_layers_without_merges_compute_the_towers_own_layers(tower, attn):
    # A schedule of zeros still runs every layer through the split (attention, residual,
    # MLP) with the size bias: it must give the tower's own hidden states.
    model = tiny_llava(tower, attn=attn)
    vision = model.model.vision_tower
    pixels = images(2)
    with torch.no_grad():
        expected = vision(pixels, output_hidden_states=True).hidden_states
        plan = TowerMerge(schedule=[0, 0, 0], protected=1)
        with ToMeTower(_layers(vision), plan, num_heads=4).merging():
            got = vision(pixels, output_hidden_states=True).hidden_states
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(layer) for layer in _layers(vision))


def test_siglip_layers_split_the_same_way():
    case = CASES["llava_onevision"]
    model = case.build("sdpa", 0)
    vision = model.model.vision_tower
    pixels = case.images([0], 0)["pixel_values"][0]
    with torch.no_grad():
        expected = vision(pixels, output_hidden_states=True).hidden_states
        with ToMeTower(_layers(vision), TowerMerge([0, 0, 0], protected=0), 4).merging():
            got = vision(pixels, output_hidden_states=True).hidden_states
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_merges_inside_the_tower_by_default_and_rows_stay_independent(tower):
    model = tiny_llava(tower)
    pixels = images(3, seed=2)
    with torch.no_grad(), prumerge.apply(model, "tome", keep=12) as handle:
        together = handle.encode_images(pixels)
        assert handle.adapter.tower.tome_tower(36) is not None  # no fallback
        assert handle.stats.tokens_out == [12, 12, 12]
        for row in range(3):
            alone = handle.encode_images(pixels[row : row + 1])
            torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), prumerge.apply(model, "tome", keep=12, where="after") as handle:
        after = handle.encode_images(pixels)
        assert handle.adapter.tower.merge_layers is None
    assert not torch.allclose(after[0], together[0])


def test_full_budget_leaves_the_tower_unpatched():
    model = tiny_llava("clip")
    pixels = images(2)
    with torch.no_grad():
        expected = model.model.get_image_features(pixels).pooler_output
        with prumerge.apply(model, "tome", keep=1.0) as handle:
            got = handle.encode_images(pixels)
            assert handle.adapter.tower.tome_tower(36) is None
    for want, have in zip(expected, got, strict=True):
        assert torch.equal(want, have)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_families_that_cannot_patch_their_tower(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    with pytest.raises(PrumergeError, match="cannot merge inside the vision tower here"):
        prumerge.apply(model, "tome", keep=8, where="tower")
    # "auto" merges after the tower there, exactly as where="after".
    image_inputs = case.images([0, 1], 0)
    outputs = {}
    for where in ("auto", "after"):
        with torch.no_grad(), prumerge.apply(model, "tome", keep=8, where=where) as handle:
            outputs[where] = handle.encode_images(**image_inputs)
    for auto, after in zip(outputs["auto"], outputs["after"], strict=True):
        assert torch.equal(auto, after)


def test_unsupported_towers_and_budgets_give_one_line_errors():
    flash = tiny_llava("clip")
    flash.model.vision_tower.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PrumergeError, match="flash_attention_2 attention cannot add the size"):
        prumerge.apply(flash, "tome", keep=12, where="tower")
    registers = tiny_llava("dinov2")
    registers.model.vision_tower.config.num_register_tokens = 2
    registers.config.vision_config.num_register_tokens = 2
    with pytest.raises(PrumergeError, match="register tokens"):
        prumerge.apply(registers, "tome", keep=12, where="tower")
    # Two layers can at most halve 36 patches twice: 9 is the least they reach.
    model = tiny_llava("clip")
    message = "keep=4 is out of reach.*down to 9 at the fewest"
    with (
        prumerge.apply(model, "tome", keep=4) as handle,
        pytest.raises(PrumergeError, match=message),
    ):
        handle.encode_images(images(1))
    with pytest.raises(ValueError, match="round size"):
        build_method("tome", r=2, where="tower")
