"""Layer indices and the reduction step of the serving path, against the Hugging Face adapter.

The engine computes the feature layer's hidden states and the attention layer's q/k its own
way; given the same tensors, ``reduce_patches`` must keep exactly the adapter's tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError
from prumerge.methods import build_method
from prumerge.serve.vision import reduce_patches, tower_layout
from tests.adapters.conftest import IMAGE_SIZE, tiny_llava, varied_images

METHODS = [
    ("prumerge", {"keep": 8}),
    ("prumerge+", {"keep": 12}),
    ("visionzip", {"keep": 8}),
    ("cls_topk", {"keep": 8}),
    ("tome", {"keep": 8}),
    ("pool", {"keep": 9}),
    ("none", {}),
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
    return out.hidden_states[layout.feature_index], captured.get("q"), captured.get("k")


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
@pytest.mark.parametrize(("name", "options"), METHODS, ids=[m for m, _ in METHODS])
def test_reduce_patches_keeps_the_adapters_tokens(tower, name, options):
    model = tiny_llava(tower)
    pixels = varied_images()
    method = build_method(name, **options)
    layout = tower_layout(model.config, method)
    with torch.no_grad():
        hidden, q, k = _hidden_and_qk(model, layout, pixels)
        ours = reduce_patches(method, layout, hidden, (IMAGE_SIZE, IMAGE_SIZE), q, k)
        with prumerge.apply(model, name, **options) as handle:
            handle.encode_images(pixels)
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
    prumerge_layout = tower_layout(config, build_method("prumerge", keep=64))
    assert (prumerge_layout.feature_index, prumerge_layout.attention_layer) == (23, 23)
    assert prumerge_layout.layers_needed == 24  # the consumer layer is built too
    visionzip_layout = tower_layout(config, build_method("visionzip", keep=64))
    assert (visionzip_layout.attention_layer, visionzip_layout.layers_needed) == (22, 23)
    pool_layout = tower_layout(config, build_method("pool", keep=64))
    assert (pool_layout.attention_layer, pool_layout.layers_needed) == (None, 23)


@pytest.mark.parametrize(
    ("config", "method", "has_cls", "message"),
    [
        (
            _config(model_type="siglip_vision_model", strategy="full"),
            "prumerge",
            False,
            "no \\[CLS\\]",
        ),
        (_config(model_type="siglip_vision_model"), "pool", False, "'full'"),
        (_config(strategy="full"), "pool", True, "'default'"),
        (_config(layer=-1), "prumerge", True, "last output"),
        (_config(layer=0), "visionzip", True, "embeddings"),
        (_config(layer=9), "pool", True, "out of range"),
        (_config(layer=[-2, -1]), "pool", True, "single int"),
    ],
)
def test_layout_refuses_what_it_cannot_serve(config, method, has_cls, message):
    with pytest.raises(PrumergeError, match=message):
        tower_layout(config, build_method(method, keep=8), has_cls=has_cls)


def test_layout_refuses_mean_importance():
    """The plugin's towers give [CLS] attention only; the adapters' mean attention is not
    served, so asking for it is an error rather than a silent [CLS] reduction."""
    with pytest.raises(PrumergeError, match="importance='mean' is not served"):
        tower_layout(_config(), build_method("prumerge", keep=8, importance="mean"))
    layout = tower_layout(_config(), build_method("prumerge", keep=8, importance="cls"))
    assert layout.attention_layer is not None


def test_a_tower_without_cls_serves_attention_free_methods():
    config = _config(model_type="siglip_vision_model", strategy="full")
    layout = tower_layout(config, build_method("pool", keep=8), has_cls=False)
    assert layout.num_prefix_tokens == 0 and layout.attention_layer is None
    hidden = torch.randn(2, 16, 8)
    reduction = reduce_patches(build_method("pool", keep=4), layout, hidden, (56, 56))
    assert reduction.lengths.tolist() == [4, 4]
    torch.testing.assert_close(reduction.tokens[0, 0], hidden[0, [0, 1, 4, 5]].mean(dim=0))
