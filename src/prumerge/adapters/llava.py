"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one view per image, reduced before the
projector.

Patch tokens: the ``vision_feature_layer`` hidden states of a CLIP, DINOv2 or SigLIP tower,
without [CLS] (``vision_feature_select_strategy="default"``; SigLIP, which has no [CLS], uses
"full"). DINOv2's register tokens reach the LLM unreduced, before the patches, as they do
without reduction. Grid: the pixel grid over the patch size. Keys and importance: the
``ViTTower``'s; ToMe merges inside the tower (``adapters/tome_tower.py``). Reduced tokens: the projector's output, one run of placeholders per image.
A method that selects on the projector's outputs (``feature_space="projected"``) gets every
patch projected (the projector is per token) and its tokens go to the LLM as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prumerge.adapters.base import Encoded, FamilyAdapter, TokenStats, register_family
from prumerge.adapters.handle import Handle, apply
from prumerge.adapters.towers import ViTTower, execution_device
from prumerge.errors import PrumergeError
from prumerge.methods import Method, projects_first

__all__ = ["Handle", "LlavaAdapter", "TokenStats", "apply"]


@register_family
class LlavaAdapter(FamilyAdapter):
    family = "llava"
    title = "LLaVA-1.5"
    model_classes = ("LlavaForConditionalGeneration",)
    object_layer_attention = True

    def __init__(self, model: nn.Module, method: Method, **options: Any) -> None:
        super().__init__(model, method, **options)
        self.tower = ViTTower(model.model.vision_tower, model.config, method)

    def _pixels(self, images: dict[str, Any]) -> torch.Tensor:
        pixel_values = images["pixel_values"]
        if pixel_values.ndim != 4:
            raise PrumergeError(
                f"pixel_values must be (images, channels, height, width); got "
                f"{tuple(pixel_values.shape)}"
            )
        return pixel_values

    def placeholder_counts(self, images: dict[str, Any]) -> torch.Tensor:
        pixel_values = self._pixels(images)
        rows, cols = self.tower.grid(pixel_values)
        count = rows * cols + self.tower.num_passthrough
        return torch.full((pixel_values.shape[0],), count, dtype=torch.long)

    def encode(self, images: dict[str, Any]) -> Encoded:
        pixel_values = self._pixels(images)
        out = self.tower.run(pixel_values)
        device = execution_device(self.projector)
        if out.reduction is not None:  # the method merged inside the tower (ToMe)
            reduction = out.reduction
            tokens = torch.cat(
                [out.passthrough.to(reduction.tokens.dtype), reduction.tokens], dim=1
            )
            projected = self.projector(tokens.to(device))  # (I, R + K, H)
        elif projects_first(self.method):
            inputs = out.inputs
            inputs.tower_features = inputs.features
            inputs.features = self.projector(inputs.features.to(device))  # (I, N, H)
            inputs.space = "projected"
            if inputs.cls_token is not None:
                inputs.cls_token = self.projector(inputs.cls_token.to(device))
            if inputs.keys is not None and inputs.cls_attn is not None:
                inputs.keys, inputs.cls_attn = inputs.keys.to(device), inputs.cls_attn.to(device)
            self.add_instruction(inputs, range(inputs.features.shape[0]))
            reduction = self.method.reduce(inputs)
            registers = self.projector(out.passthrough.to(device))  # (I, R, H)
            projected = torch.cat([registers.to(reduction.tokens.dtype), reduction.tokens], dim=1)
        else:
            self.add_instruction(out.inputs, range(out.inputs.features.shape[0]))
            reduction = self.method.reduce(out.inputs)
            tokens = torch.cat(
                [out.passthrough.to(reduction.tokens.dtype), reduction.tokens], dim=1
            )
            projected = self.projector(tokens.to(device))  # (I, R + K, H)
        registers = out.passthrough.shape[1]
        lengths = (reduction.lengths + registers).tolist()
        if self.tower.resizes:  # a smaller image: its tokens take the first placeholders
            anchors = [torch.arange(n, device=projected.device) for n in lengths]
        else:
            patches = reduction.anchors() + registers  # registers stand at themselves
            prefix = torch.arange(registers, device=patches.device)
            anchors = [
                torch.cat([prefix, row[: n - registers]])
                for row, n in zip(patches, lengths, strict=True)
            ]
        return Encoded(
            features=[row[:n] for row, n in zip(projected, lengths, strict=True)],
            tokens_in=self.placeholder_counts(images).tolist(),
            reductions=[reduction],
            anchors=anchors,
        )
