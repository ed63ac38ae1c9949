"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): anyres images.

Patch tokens: each view's ``vision_feature_layer`` features of a CLIP (or SigLIP) tower,
laid out by the model's own ``pack_image_features`` into a base view and a stitched,
unpadded high-res view (see ``anyres``). Keys and importance: the ``ViTTower``'s, per view.
Reduced tokens: base, high-res, then one ``image_newline``; budgets per image or per view.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from prumerge.adapters.anyres import AnyresAdapter
from prumerge.adapters.base import register_family


@register_family
class LlavaNextAdapter(AnyresAdapter):
    family = "llava_next"
    title = "LLaVA-NeXT"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def views_per_image(self, images: dict[str, Any]) -> list[int]:
        count = inspect.getmodule(type(self.model)).image_size_to_num_patches  # type: ignore[union-attr]
        config = self.model.config
        return [
            count(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for size in images["image_sizes"]
        ]

    def pack(
        self, views: list[torch.Tensor], images: dict[str, Any], newline: torch.Tensor
    ) -> list[torch.Tensor]:
        packed, _ = self.model.model.pack_image_features(
            views,
            images["image_sizes"],
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            image_newline=newline,
        )
        return packed
