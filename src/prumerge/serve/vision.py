"""Where a served LLaVA's patch features and [CLS] attention come from, and their reduction.

The serving engine runs the vision tower its own way (vLLM's CLIP, or the transformers
module for towers vLLM lacks); these functions take what it computed, as tensors, and
reduce it with the same ``prumerge.methods`` / ``prumerge.ops`` code that the Hugging Face
adapter calls, so a fixed budget keeps the same tokens in both. Torch only; no engine import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.methods import VisionInputs, VisionMethod
from prumerge.ops import Reduction, cls_attention


@dataclass(frozen=True)
class TowerLayout:
    """The indices a reduction needs, derived from a LLaVA config and a method.

    Attributes:
        num_layers: encoder layers of the vision tower.
        feature_index: index into the tower's hidden states (0 = the embeddings) of the
            features the projector reads.
        attention_layer: encoder layer whose [CLS] attention and keys the method reads, or
            None when it reads none.
        num_prefix_tokens: leading non-patch tokens ([CLS], then registers).
        num_heads: attention heads of the tower.
        patch_size: pixels per patch side.
    """

    num_layers: int
    feature_index: int
    attention_layer: int | None
    num_prefix_tokens: int
    num_heads: int
    patch_size: int

    @property
    def layers_needed(self) -> int:
        """Encoder layers the tower must run: up to the feature layer and the attention layer."""
        last = self.feature_index
        if self.attention_layer is not None:
            last = max(last, self.attention_layer + 1)
        return last


def tower_layout(config: Any, method: VisionMethod, *, has_cls: bool = True) -> TowerLayout:
    """Derive the layer indices and token counts of a LLaVA config for ``method``.

    Args:
        config: a LLaVA config (``vision_config``, ``vision_feature_layer``,
            ``vision_feature_select_strategy``).
        method: the reduction method; attention methods need a tower with a [CLS] token.
        has_cls: whether the tower prepends a [CLS] token (CLIP, DINOv2; not SigLIP).
    """
    vision = config.vision_config
    num_layers = vision.num_hidden_layers
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise PrumergeError(
            f"vision_feature_layer={layer!r} is not handled; supported: a single int layer"
        )
    if not -(num_layers + 1) <= layer <= num_layers:
        raise PrumergeError(
            f"vision_feature_layer={layer} is out of range for a {num_layers}-layer tower"
        )
    # The hidden states are the embeddings, then each layer's output: num_layers + 1 entries.
    feature_index = layer % (num_layers + 1)
    registers = getattr(vision, "num_register_tokens", 0) or 0
    # The reduction sees patch tokens only: a [CLS] tower's "default" strategy drops the
    # [CLS] token, and a tower without one ("full") has nothing to drop.
    strategy = config.vision_feature_select_strategy
    expected = "default" if has_cls else "full"
    if strategy != expected:
        raise PrumergeError(
            f"vision_feature_select_strategy={strategy!r} is not handled for a "
            f"{vision.model_type} tower; supported: {expected!r} (the patch tokens only)"
        )
    attention_layer = None
    if method.needs_attention:
        if not has_cls:
            raise PrumergeError(
                f"method {method.name!r} needs the [CLS] attention, and this "
                f"{vision.model_type} tower has no [CLS] token; serve it with a method that "
                f"reads no attention (pool, random, divprune or none), or use a CLIP or "
                f"DINOv2 tower"
            )
        if getattr(method, "importance", "auto") == "mean":
            # The adapters can read the mean attention each patch receives; the plugin's
            # towers capture [CLS] attention only.
            raise PrumergeError(
                f"method {method.name!r} with importance='mean' is not served yet: the vLLM "
                f"plugin reads the [CLS] attention; use importance='auto' or 'cls'"
            )
        # PruMerge reads the layer that consumes the selected features; VisionZip the one
        # that produces them (as in the Hugging Face adapter).
        if method.attention_source == "consumer":
            attention_layer = feature_index
            if attention_layer >= num_layers:
                raise PrumergeError(
                    f"vision_feature_layer={layer} is the tower's last output: no encoder layer "
                    f"consumes it, so there is no [CLS] attention to use"
                )
        else:
            attention_layer = feature_index - 1
            if attention_layer < 0:
                raise PrumergeError(
                    f"vision_feature_layer={layer} selects the embeddings: no encoder layer "
                    f"produces them, so {method.name} has no attention to use"
                )
    return TowerLayout(
        num_layers=num_layers,
        feature_index=feature_index,
        attention_layer=attention_layer,
        num_prefix_tokens=(1 + registers) if has_cls else 0,
        num_heads=vision.num_attention_heads,
        patch_size=vision.patch_size,
    )


def reduce_patches(
    method: VisionMethod,
    layout: TowerLayout,
    hidden: torch.Tensor,
    pixel_shape: tuple[int, int],
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> Reduction:
    """Reduce one batch of images' selected-layer features with ``method``.

    Args:
        method: the reduction method.
        layout: from ``tower_layout``.
        hidden: (B, P + N, C) hidden states of the feature layer, prefix tokens first.
        pixel_shape: (height, width) of the input images, for the patch grid.
        q: (B, P + N, C) query projections of ``layout.attention_layer`` (attention methods).
        k: (B, P + N, C) key projections of the same layer.

    Returns:
        The method's ``Reduction`` of the N patch tokens (before the projector).
    """
    prefix = layout.num_prefix_tokens
    features = hidden[:, prefix:]  # (B, N, C)
    rows, cols = (s // layout.patch_size for s in pixel_shape)
    grid = (rows, cols) if rows * cols == features.shape[1] else None
    inputs = VisionInputs(features=features, grid=grid)
    if method.needs_attention:
        if q is None or k is None:
            raise PrumergeError(f"method {method.name!r} needs the q/k of the attention layer")
        inputs.keys = k[:, prefix:]
        inputs.cls_attn = cls_attention(
            q,
            k,
            num_heads=layout.num_heads,
            num_prefix_tokens=prefix,
            mode=method.attention_mode,  # type: ignore[arg-type]
        )
    return method.reduce(inputs)
