"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres images on a SigLIP
tower, which has no [CLS] token, so the importance is the mean attention each patch receives
(``importance="mean"``, chosen automatically).

Patch tokens: each view's ``vision_feature_layer`` features (-1 by default: the last layer's
output, so the importance and keys come from the layer that produces them), laid out by the
model's own ``pack_image_features``: a base view and the stitched, unpadded high-res view,
shrunk (bilinear, with its keys and importance) when larger than ``vision_aspect_ratio``
allows. Images in rows with several images have the base view only (``batch_num_images``).
Reduced tokens: base, high-res, then one ``image_newline``; budgets per image or per view.
Videos are not reduced.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from prumerge.adapters.anyres import AnyresAdapter
from prumerge.adapters.base import register_family


@register_family
class LlavaOnevisionAdapter(AnyresAdapter):
    family = "llava_onevision"
    title = "LLaVA-OneVision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")

    def views_per_image(self, images: dict[str, Any]) -> list[int]:
        count = inspect.getmodule(type(self.model)).image_size_to_num_patches  # type: ignore[union-attr]
        config = self.model.config
        sizes = images["image_sizes"]
        per_row = images.get("batch_num_images")
        # Images that share a row with other images are sent as their base view only.
        alone = (
            [True] * len(sizes) if per_row is None else [n == 1 for n in per_row for _ in range(n)]
        )
        return [
            count(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            if single
            else 1
            for size, single in zip(sizes, alone, strict=True)
        ]

    def pack(
        self, views: list[torch.Tensor], images: dict[str, Any], newline: torch.Tensor
    ) -> list[torch.Tensor]:
        packed, _ = self.model.model.pack_image_features(
            views,
            images["image_sizes"],
            image_newline=newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return packed
