"""Layer indices and the reduction step of the serving path, against the Hugging Face adapter.

The engine computes the feature layer's hidden states and the attention layer's q/k its own
way; given the same tensors, ``reduce_patches`` must keep exactly the adapter's tokens. The
layout is the adapter's own (``prumerge.adapters.towers.tower_layout``), so these tests also
check that a config's tower type names the class the adapter would see.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import prumerge
from prumerge.adapters.towers import ViTTower
from prumerge.errors import PrumergeError
from prumerge.methods import build_method
from prumerge.serve.vision import layers_needed, layout_of, reduce_patches
from tests.adapters.conftest import IMAGE_SIZE, tiny_llava, varied_images

METHODS = [
    ("prumerge", {"keep": 8}),
    ("prumerge+", {"keep": 12}),
    ("visionzip", {"keep": 8}),
    ("cls_topk", {"keep": 8}),
    ("tome", {"keep": 8, "where": "after"}),
    ("pool", {"keep": 9}),
    ("none", {}),
    # The mean attention each patch receives, which the adapters offer on [CLS] towers too.
    ("prumerge", {"importance": "mean", "keep": 8}),
    ("prumerge+", {"importance": "mean"}),  # adaptive: the count comes from the image
]


def _hidden_and_qk(model, layout, pixels):
    """What an engine hands over: the feature layer's hidden states and the layer's q/k."""
    tower = model.model.vision_tower
    captured = {}
    hooks = []
    if layout.attention_layer is not None:
        layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer
        attention = layers[layout.attention_layer]
        attention = attention.self_attn if hasattr(attention, "self_attn") else attention.attention
        for name, module in (("q", attention.q_proj), ("k", attention.k_proj)):
            hooks.append(
                module.register_forward_hook(lambda _m, _i, out, n=name: captured.update({n: out}))
            )
    try:
        out = tower(pixels, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    return out.hidden_states[layout.feature_layer], captured.get("q"), captured.get("k")


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
@pytest.mark.parametrize(("name", "options"), METHODS, ids=[m for m, _ in METHODS])
def test_reduce_patches_keeps_the_adapters_tokens(tower, name, options):
    model = tiny_llava(tower)
    pixels = varied_images()
    method = build_method(name, **options)
    layout = layout_of(model.config, method)
    # The adapter's own tower reads the same layout from the module it is given.
    assert ViTTower(model.model.vision_tower, model.config, method).layout == layout
    with torch.no_grad():
        hidden, q, k = _hidden_and_qk(model, layout, pixels)
        ours, passthrough = reduce_patches(method, layout, hidden, (IMAGE_SIZE, IMAGE_SIZE), q, k)
        with prumerge.apply(model, name, **options) as handle:
            handle.encode_images(pixels)
    assert passthrough.shape[1] == 0
    theirs = handle.last_reduction
    assert ours.lengths.tolist() == theirs.lengths.tolist()
    assert torch.equal(ours.index, theirs.index)
    torch.testing.assert_close(ours.tokens, theirs.tokens, rtol=0, atol=0)


def _config(layers=4, layer=-2, strategy="default", model_type="clip_vision_model"):
    vision = SimpleNamespace(
        num_hidden_layers=layers,
        num_attention_heads=4,
        patch_size=14,
        model_type=model_type,
    )
    return SimpleNamespace(
        vision_config=vision,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
    )


def test_layout_reads_one_layer_past_the_features_for_prumerge_only():
    config = _config(layers=24, layer=-2)  # LLaVA-1.5: features of layer 23 of 24
    prumerge_layout = layout_of(config, build_method("prumerge", keep=64))
    assert (prumerge_layout.feature_layer, prumerge_layout.attention_layer) == (23, 23)
    assert layers_needed(prumerge_layout) == 24  # the consumer layer is built too
    visionzip_layout = layout_of(config, build_method("visionzip", keep=64))
    assert (visionzip_layout.attention_layer, layers_needed(visionzip_layout)) == (22, 23)
    pool_layout = layout_of(config, build_method("pool", keep=64))
    assert (pool_layout.attention_layer, layers_needed(pool_layout)) == (None, 23)


SIGLIP = {"model_type": "siglip_vision_model", "strategy": "full"}


@pytest.mark.parametrize(
    ("config", "method", "options", "message"),
    [
        (_config(**SIGLIP), "prumerge", {"importance": "cls"}, "needs a \\[CLS\\] token"),
        (_config(model_type="siglip_vision_model"), "pool", {}, "'full'"),
        (_config(strategy="full"), "pool", {}, "'default'"),
        (_config(layer=-1), "prumerge", {}, "last output"),
        (_config(layer=0), "visionzip", {}, "embeddings"),
        (_config(layer=9), "pool", {}, "out of range"),
        (_config(layer=[-2, -1]), "pool", {}, "single int"),
        (_config(model_type="pixtral"), "pool", {}, "'pixtral' is not supported"),
    ],
)
def test_layout_refuses_what_it_cannot_serve(config, method, options, message):
    with pytest.raises(PrumergeError, match=message):
        layout_of(config, build_method(method, keep=8, **options))


def test_mean_importance_is_served_as_the_adapters_read_it():
    """importance='mean' on a [CLS] tower, and the default on SigLIP (no [CLS]), as in the
    adapters; at the last layer the mean attention comes from the layer that made it."""
    assert layout_of(_config(), build_method("prumerge", keep=8, importance="mean")).importance == (
        "mean"
    )
    siglip = layout_of(_config(**SIGLIP), build_method("prumerge", keep=8))
    assert (siglip.importance, siglip.num_prefix_tokens, siglip.attention_layer) == ("mean", 0, 3)
    last = layout_of(_config(**SIGLIP, layer=-1), build_method("prumerge", keep=8))
    assert (last.feature_layer, last.attention_layer) == (4, 3)


def test_a_tower_without_cls_serves_attention_free_methods():
    layout = layout_of(_config(**SIGLIP), build_method("pool", keep=8))
    assert layout.num_prefix_tokens == 0 and layout.attention_layer is None
    hidden = torch.randn(2, 16, 8)
    reduction, _ = reduce_patches(build_method("pool", keep=4), layout, hidden, (56, 56))
    assert reduction.lengths.tolist() == [4, 4]
    torch.testing.assert_close(reduction.tokens[0, 0], hidden[0, [0, 1, 4, 5]].mean(dim=0))


def test_registers_pass_through_unreduced():
    """DINOv2's registers follow [CLS]; like the adapter, serving sends them unreduced."""
    config = _config(model_type="dinov2_with_registers")
    config.vision_config.num_register_tokens = 2
    layout = layout_of(config, build_method("pool", keep=4))
    assert (layout.num_prefix_tokens, layout.num_passthrough) == (3, 2)
    hidden = torch.randn(2, 3 + 16, 8)
    reduction, passthrough = reduce_patches(build_method("pool", keep=4), layout, hidden, (56, 56))
    torch.testing.assert_close(passthrough, hidden[:, 1:3])
    # The first pooled token averages the top-left 2x2 patches (after the 3 prefix tokens).
    torch.testing.assert_close(reduction.tokens[0, 0], hidden[0, [3, 4, 7, 8]].mean(dim=0))
