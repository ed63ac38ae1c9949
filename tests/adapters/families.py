"""Tiny random configurations of every supported family, and inputs built for them.

``CASES`` has one entry per family registered in ``prumerge.adapters.FAMILIES``; the
guarantee tests are parametrised over it, and ``test_every_family_has_a_case`` fails when a
family is registered without one. No weights are downloaded: every model is built from the
family's config in ``prumerge.models.tiny`` (the table ``scripts/tiny_checkpoints.py`` saves)
with random weights (the vision towers' queries are scaled up so that attention is peaked,
as in trained towers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    Gemma3ForConditionalGeneration,
    InternVLForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from prumerge.models import tiny
from prumerge.models.tiny import VIEW, peaked

from .conftest import IMAGE_SIZE, IMAGE_TOKEN, tiny_llava

#: Layers of the text models and vision towers here: one more than the tiny checkpoints'.
LAYERS = 3
#: Anyres image sizes (height, width): 2 tiles (unpadded), 2 tiles the other way, 4 tiles.
ANYRES_SIZES = [(30, 70), (64, 20), (50, 50)]
#: Qwen image grids (t, h, w) in ViT patches; merged grids 4x6, 4x4, 6x4.
QWEN_GRIDS = [(1, 8, 12), (1, 8, 8), (1, 12, 8)]


def _set_attn(model: torch.nn.Module, attn: str) -> torch.nn.Module:
    model.set_attn_implementation(attn)
    return model


@dataclass
class Case:
    """One family's tiny model and how to make inputs for it.

    Attributes:
        family: the key in ``prumerge.adapters.FAMILIES``.
        build: ``build(attn, seed)`` -> an eval-mode model.
        images: ``images(indices, seed)`` -> the image inputs (``pixel_values`` and the
            family's other inputs) for those of the case's image kinds.
        kinds: how many image kinds (sizes) the case has.
        multi_image: whether a prompt may hold several images.
        extra: per-call inputs that depend on the rows (``batch_num_images``).
        counts: ``counts(model, inputs, kinds)`` -> tokens per image as the unpatched
            model makes them, for families the default below does not cover.
        token_types: the name of the input that marks image tokens (``mm_token_type_ids``,
            Gemma 3's ``token_type_ids``), or None.
        refuses: methods the family refuses, each with a part of its one-line error.
    """

    family: str
    build: Callable[[str, int], torch.nn.Module]
    images: Callable[[list[int], int], dict[str, Any]]
    kinds: int
    multi_image: bool = True
    row_inputs: Callable[[list[list[int]]], dict[str, Any]] = field(default=lambda rows: {})
    counts: Callable[[torch.nn.Module, dict[str, Any], list[int]], list[int]] | None = None
    token_types: str | None = None
    refuses: dict[str, str] = field(default_factory=dict)

    def placeholder_counts(
        self, model: torch.nn.Module, inputs: dict[str, Any], kinds: list[int]
    ) -> list[int]:
        """Tokens per image as the unpatched model makes them (its own code)."""
        if self.counts is not None:
            with torch.no_grad():
                return self.counts(model, inputs, kinds)
        with torch.no_grad():
            if self.family == "llava":
                out = model.model.get_image_features(inputs["pixel_values"]).pooler_output
                return [f.shape[0] for f in out]
            if self.family.startswith("qwen"):
                merge = model.config.vision_config.spatial_merge_size
                return (inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
            extra = {k: v for k, v in inputs.items() if k == "batch_num_images"}
            out = model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], **extra
            )
            return [f.shape[0] for f in out.pooler_output]


def _llava(attn: str, seed: int) -> torch.nn.Module:
    model = tiny_llava("clip", attn=attn, seed=seed, text_layers=3)
    model.model.language_model.set_attn_implementation(attn)
    return model


def _draw(shape: tuple[int, ...], kind: int, seed: int) -> torch.Tensor:
    """An image of one kind: the same pixels wherever it appears in a batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * seed + kind))


def _llava_images(kinds: list[int], seed: int) -> dict[str, Any]:
    # Scaled differently, so that the [CLS] attention and the adaptive counts differ.
    pixels = [_draw((3, IMAGE_SIZE, IMAGE_SIZE), k, seed) * (1.0, 3.0, 0.1)[k % 3] for k in kinds]
    return {"pixel_values": torch.stack(pixels)}


def _llava_next(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny.llava_next(LAYERS))
    return _set_attn(peaked(model.eval()), attn)


def _anyres_images(kinds: list[int], seed: int) -> dict[str, Any]:
    pixels = torch.stack([_draw((5, 3, VIEW, VIEW), k, seed) for k in kinds])  # <= 1 + 4 views
    sizes = torch.tensor([ANYRES_SIZES[k] for k in kinds])
    return {"pixel_values": pixels, "image_sizes": sizes}


def _llava_onevision(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(tiny.llava_onevision(LAYERS))
    return _set_attn(peaked(model.eval()), attn)


def _qwen2_5_vl(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny.qwen2_5_vl(LAYERS))
    return _set_attn(peaked(model.eval()), attn)


def _qwen2_vl(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny.qwen2_vl(LAYERS))
    return _set_attn(peaked(model.eval()), attn)


def _qwen3_vl(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny.qwen3_vl(LAYERS))
    return _set_attn(peaked(model.eval()), attn)


def _qwen_images(kinds: list[int], seed: int) -> dict[str, Any]:
    grids = torch.tensor([QWEN_GRIDS[k] for k in kinds])
    # Processor layout: one row of (channels x 2 frames x 4 x 4) values per ViT patch.
    rows = [
        _draw((int(g.prod()), 3 * 2 * 4 * 4), k, seed) for g, k in zip(grids, kinds, strict=True)
    ]
    return {"pixel_values": torch.cat(rows), "image_grid_thw": grids}


#: InternVL tiles per image kind: one tile (no thumbnail), 2 + thumbnail, 4 + thumbnail.
INTERNVL_TILES = [1, 3, 5]


def _internvl(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(tiny.internvl(LAYERS, qk_norm=True)).eval()
    with torch.no_grad():  # peaked attention: the q norm's gain, since q is normed
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_norm.weight.mul_(6.0)
    return _set_attn(model, attn)


def _internvl_images(kinds: list[int], seed: int) -> dict[str, Any]:
    tiles = [_draw((INTERNVL_TILES[k], 3, tiny.TILE, tiny.TILE), k, seed) for k in kinds]
    return {"pixel_values": torch.cat(tiles)}


def _internvl_counts(model: torch.nn.Module, inputs: dict[str, Any], kinds: list[int]) -> list[int]:
    per_tile = model.model.get_image_features(inputs["pixel_values"]).pooler_output.shape[1]
    return [INTERNVL_TILES[k] * per_tile for k in kinds]


def _gemma3(attn: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny.gemma3(LAYERS)).eval()
    with torch.no_grad():  # the projection starts at zero: give the images some weight
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    model = peaked(model)
    model.model.language_model.set_attn_implementation(attn)
    return _set_attn(model, attn)


def _gemma3_images(kinds: list[int], seed: int) -> dict[str, Any]:
    # Scaled differently, so that the attention and the adaptive counts differ.
    shape = (3, tiny.TILE, tiny.TILE)
    return {
        "pixel_values": torch.stack([_draw(shape, k, seed) * (1.0, 3.0, 0.3)[k] for k in kinds])
    }


def _gemma3_counts(model: torch.nn.Module, inputs: dict[str, Any], kinds: list[int]) -> list[int]:
    out = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    return [out.shape[1]] * out.shape[0]


def _per_row(rows: list[list[int]]) -> dict[str, Any]:
    return {"batch_num_images": torch.tensor([len(r) for r in rows])}


ANYRES_FIXED = "anyres views have the tower's fixed size"
QK_NORM = "normalises q and k per head \\(QK-norm\\)"
#: The LLM-side methods, which the QK-norm decoders refuse.
LLM_SIDE = ("fastv", "dart", "pdrop", "sparsevlm")
TWO_LAYERS = "reads the attention of two vision-tower layers"
CASES = {
    "llava": Case("llava", _llava, _llava_images, kinds=3),
    "llava_next": Case(
        "llava_next", _llava_next, _anyres_images, kinds=3, refuses={"downsample": ANYRES_FIXED}
    ),
    "llava_onevision": Case(
        "llava_onevision",
        _llava_onevision,
        _anyres_images,
        kinds=3,
        row_inputs=_per_row,
        refuses={"downsample": ANYRES_FIXED},
    ),
    "qwen2_5_vl": Case(
        "qwen2_5_vl",
        _qwen2_5_vl,
        _qwen_images,
        kinds=3,
        token_types="mm_token_type_ids",
    ),
    "qwen2_vl": Case(
        "qwen2_vl",
        _qwen2_vl,
        _qwen_images,
        kinds=3,
        token_types="mm_token_type_ids",
    ),
    "qwen3_vl": Case(
        "qwen3_vl",
        _qwen3_vl,
        _qwen_images,
        kinds=3,
        token_types="mm_token_type_ids",
        # With a budget pdrop may start at layer 1, before the DeepStack layers end.
        refuses={
            **{m: QK_NORM for m in LLM_SIDE},
            "pdrop": "DeepStack features",
            "hiprune": TWO_LAYERS,
        },
    ),
    "internvl": Case(
        "internvl",
        _internvl,
        _internvl_images,
        kinds=3,
        counts=_internvl_counts,
        refuses={"downsample": "its tiles have the tower's fixed size"},
    ),
    "gemma3": Case(
        "gemma3",
        _gemma3,
        _gemma3_images,
        kinds=3,
        counts=_gemma3_counts,
        token_types="token_type_ids",
        refuses={
            "downsample": "pools the tower's fixed grid",
            **{m: QK_NORM for m in LLM_SIDE},
        },
    ),
}


def build_batch(
    case: Case, model: torch.nn.Module, rows: list[tuple[list[list[int]], list[int]]], seed: int = 0
) -> dict[str, Any]:
    """Left-padded inputs: each row is (text parts, image kinds); the images go between parts.

    ``rows[i] = ([[1, 2], [3, 4]], [0])`` is ids 1 2, image of kind 0, ids 3 4.
    """
    kinds = [k for _, row_kinds in rows for k in row_kinds]
    inputs = case.images(kinds, seed)
    inputs.update(case.row_inputs([row_kinds for _, row_kinds in rows]))
    counts = case.placeholder_counts(model, inputs, kinds)
    ids_rows, image = [], 0
    for parts, row_kinds in rows:
        assert len(parts) == len(row_kinds) + 1
        ids = list(parts[0])
        for part in parts[1:]:
            ids += [IMAGE_TOKEN] * counts[image] + list(part)
            image += 1
        ids_rows.append(ids)
    width = max(map(len, ids_rows))
    inputs["input_ids"] = torch.tensor([[0] * (width - len(r)) + r for r in ids_rows])
    inputs["attention_mask"] = torch.tensor(
        [[0] * (width - len(r)) + [1] * len(r) for r in ids_rows]
    )
    if case.token_types is not None:
        inputs[case.token_types] = (inputs["input_ids"] == IMAGE_TOKEN).int()
    inputs["counts"] = counts
    return inputs
