"""HiPrune's second tower layer on InternVL3 and Gemma 3: the object layer's signal is the
importance computed the same way at that layer (equal to it at the importance layer itself,
different elsewhere), pooled as the importance is; and on Qwen2/2.5-VL a ratio keeps the
release's rounded count."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError

from .families import CASES, build_batch
from .test_families import ROWS, generate


def _batches(model, inputs, layer):
    seen = []
    with prumerge.apply(model, "hiprune", keep=0.5, object_layer=layer) as handle:
        reduce = handle.method.reduce
        handle.method.reduce = lambda batch: seen.append(batch) or reduce(batch)
        generate(model, inputs, max_new_tokens=1)
    return seen


@pytest.mark.parametrize("family", ["internvl", "gemma3"])
def test_the_object_layer_is_read_like_the_importance_layer(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    depth = model.config.vision_config.num_hidden_layers
    # both read the encoder layer that outputs the features (the last one here)
    for batch in _batches(model, inputs, depth):
        torch.testing.assert_close(batch.object_importance, batch.cls_attn)
    for batch in _batches(model, inputs, 1):
        assert batch.object_importance.shape == batch.cls_attn.shape
        assert not torch.allclose(batch.object_importance, batch.cls_attn)
    with pytest.raises(PrumergeError, match=f"supported: 1 to {depth}"):
        prumerge.apply(model, "hiprune", object_layer=depth + 1)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_ratio_keeps_the_qwen_releases_count_of_merged_tokens(family):
    # Qwen2_5_VL/qwen2_5_vl_HiPrune.py of the release: round(n_image_tokens * RETAIN), n the
    # image's tokens after the 2x2 merge (24 and 16 here: 24 * 0.223 = 5.35, 16 * 0.3 = 4.8).
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    for keep in (0.223, 0.3, 0.5):
        with prumerge.apply(model, "hiprune", keep=keep, alpha=0.5, object_layer=1) as handle:
            generate(model, inputs, max_new_tokens=1)
        assert handle.stats.tokens_out == [round(n * keep) for n in inputs["counts"]]
    assert inputs["counts"] == [24, 16, 24]
