"""Methods that select on the projector's outputs (``feature_space="projected"``), on every
family: they see the projected patches (and the tower features beside them), and their tokens
reach the LLM without a second projection."""

import pytest
import torch

import prumerge
from prumerge.methods import VisionInputs, VisionMethod
from prumerge.ops import Reduction, divprune

from .families import CASES, build_batch

ROWS = [([[5, 6], [7]], [0]), ([[8], [9, 10]], [2])]


class KeepEveryOther(VisionMethod):
    """Keeps the first half of the patches unchanged and records what it was given."""

    name = "keep_every_other"
    feature_space = "projected"

    def __init__(self) -> None:
        self.seen: list[VisionInputs] = []

    def reduce(self, inputs: VisionInputs) -> Reduction:
        self.seen.append(inputs)
        num = inputs.features.shape[1]
        # All distances 0: divprune keeps the lowest indices, unchanged.
        metric = torch.ones_like(inputs.features[..., :1])
        return divprune(inputs.features, keep=max(1, num // 2), metric=metric)


@pytest.mark.parametrize("family", sorted(CASES))
def test_projected_methods_see_projected_patches_and_send_them_unchanged(family):
    case = CASES[family]
    model = case.build("sdpa", 0)
    inputs = build_batch(case, model, ROWS)
    inputs.pop("counts")
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    images.pop("mm_token_type_ids", None)
    method = KeepEveryOther()
    with prumerge.apply(model, method) as handle, torch.no_grad():
        images = handle.adapter.bind_prompt(inputs["input_ids"], images)  # InternVL's tiles
        encoded = handle.adapter.encode(images)
    assert method.seen and all(seen.space == "projected" for seen in method.seen)
    # Gemma 3's projector pools first: its per-token part maps tower to projected tokens.
    projector = getattr(handle.adapter, "project_tokens", handle.adapter.projector)
    sent = torch.cat([f for f in encoded.features])
    returned = []
    for seen, reduction in zip(method.seen, encoded.reductions, strict=True):
        if family.startswith("qwen"):
            # The merger is the projector: there is no per-token tower feature.
            assert seen.tower_features is None
        elif family != "llava_onevision" or seen.grid == method.seen[0].grid:
            # OneVision shrinks large high-res grids after the projector, so only grids it
            # leaves alone are a patch-for-patch projection of their tower features.
            with torch.no_grad():
                again = projector(seen.tower_features)
            torch.testing.assert_close(again, seen.features)
        returned += reduction.unpad()
    # Every token the LLM gets is one the method returned, not projected a second time
    # (anyres images add one newline token each).
    for token in torch.cat(returned):
        assert (sent == token).all(dim=1).any()
    newlines = len(encoded.features) if family.startswith("llava_") else 0
    assert sent.shape[0] == sum(r.shape[0] for r in returned) + newlines


def test_divprune_selects_on_the_projector_outputs_by_default():
    case = CASES["llava"]
    model = case.build("sdpa", 0)
    pixels = case.images([0, 1, 2], 0)["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        projected = model.model.multi_modal_projector(hidden[:, 1:])
        expected = divprune(projected, keep=7).unpad()
        with prumerge.apply(model, "divprune", keep=7) as handle:
            got = handle.encode_images(pixels)
        before = divprune(hidden[:, 1:], keep=7)
        with prumerge.apply(model, "divprune", keep=7, space="tower") as handle:
            tower = handle.encode_images(pixels)
    for row, want in zip(got, expected, strict=True):
        torch.testing.assert_close(row, want)
    for row, want in zip(tower, model.model.multi_modal_projector(before.tokens), strict=True):
        torch.testing.assert_close(row, want)
