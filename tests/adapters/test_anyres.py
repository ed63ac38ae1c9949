"""LLaVA-NeXT and LLaVA-OneVision: views, newlines and per-image or per-view budgets."""

import pytest
import torch

import prumerge
from prumerge.errors import PrumergeError
from prumerge.ops.select import split_budget

from .families import CASES, build_batch
from .test_families import MULTI, ROWS, generate

ANYRES = pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])


def image_inputs(handle, inputs):
    return {k: inputs[k] for k in handle.adapter.image_inputs if k in inputs}


@ANYRES
def test_views_are_laid_out_as_the_model_lays_them_out(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=5) as handle, torch.no_grad():
        images = image_inputs(handle, inputs)
        views, _, _ = handle.adapter._views(images)
        expected = model.model.get_image_features(**images).pooler_output  # the model's own
        projector = model.model.multi_modal_projector
        for image in range(3):
            base, *high = [v for v in views if v.image == image]
            torch.testing.assert_close(projector(base.features), expected[image][:16])
            rows, cols = high[0].grid
            packed = expected[image][16:].view(rows, cols + 1, -1)
            newline = model.model.image_newline
            assert torch.equal(packed[:, -1], newline.expand(rows, -1))  # newline ends rows
            if (family, image) == ("llava_onevision", 2):
                continue  # OneVision shrinks this grid after the projector, here before it
            torch.testing.assert_close(
                projector(high[0].features), packed[:, :cols].reshape(rows * cols, -1)
            )
    assert [v.grid for v in views if v.image == 0] == [(4, 4), (4, 8)]


@ANYRES
def test_a_reduced_image_is_base_then_high_res_then_one_newline(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "cls_topk", keep=11) as handle, torch.no_grad():
        features = handle.encode_images(**image_inputs(handle, inputs))
        lengths = [int(n) for r in handle.last_reductions for n in r.lengths]
    newline = model.model.image_newline
    for image in features:
        assert image.shape[0] == 11
        assert torch.equal(image[-1], newline)
        assert not (image[:-1] == newline).all(dim=1).any()
    # The 10 content tokens are split over the 16 base and the high-res patches.
    sizes = [[16, 32], [16, 16], [16, 64 if family == "llava_next" else 25]]
    expected = [n for s in sizes for n in split_budget(10, s)]  # e.g. 3 + 7 for 16 + 32
    assert sorted(lengths) == sorted(expected)


@ANYRES
def test_budget_per_view(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    with prumerge.apply(model, "visionzip", keep=3, budget_per="view") as handle:
        generate(model, inputs, max_new_tokens=1)
    assert handle.stats.tokens_out == [3 + 3 + 1] * 3  # base, high-res, newline
    with prumerge.apply(model, "prumerge", budget_per="view") as handle:
        generate(model, inputs, max_new_tokens=1)
        per_view = [int(n) for r in handle.last_reductions for n in r.lengths]
    assert sum(handle.stats.tokens_out) == sum(per_view) + 3  # adaptive: per view, + newlines


def test_onevision_images_that_share_a_row_send_their_base_view_only():
    case = CASES["llava_onevision"]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, MULTI)
    assert inputs["counts"][:2] == [16 + 1, 16 + 1]  # the processor's count for such images
    with prumerge.apply(model, "prumerge") as handle:
        out = generate(model, inputs)
    assert handle.stats.tokens_in == inputs["counts"]
    assert all(n < m for n, m in zip(handle.stats.tokens_out, inputs["counts"], strict=True))
    assert out.shape[0] == 2


@ANYRES
def test_downsample_and_registers_are_refused(family):
    model = CASES[family].build("sdpa", 0)
    with pytest.raises(PrumergeError, match="downsample is not supported on LLaVA-"):
        prumerge.apply(model, "downsample")
