"""Where a served LLaVA's patch features and attention come from, and their reduction.

The serving engine runs the vision tower its own way (vLLM's CLIP, or the transformers
module for towers vLLM lacks). The layer indices, the importance signal and the method's
inputs come from the Hugging Face adapter's own ``tower_layout`` and ``tower_inputs``
(``prumerge.adapters.towers``), so both paths derive them once, the same way, and a fixed
budget keeps the same tokens in both. Torch only; no engine import.
"""

from __future__ import annotations

from typing import Any

import torch

from prumerge.adapters.towers import TOWER_CLASSES, TowerLayout, tower_inputs, tower_layout
from prumerge.errors import PrumergeError
from prumerge.methods import VisionMethod
from prumerge.ops import Reduction

__all__ = ["TowerLayout", "layers_needed", "layout_of", "reduce_patches"]


def layout_of(config: Any, method: VisionMethod) -> TowerLayout:
    """The adapter's ``tower_layout`` for a served LLaVA config (its tower named by type).

    Raises:
        PrumergeError: for a tower or config the adapters do not handle, or a method whose
            attention the tower cannot give.
    """
    kind = config.vision_config.model_type
    tower_class = TOWER_CLASSES.get(kind)
    if tower_class is None:
        raise PrumergeError(
            f"vision tower {kind!r} is not supported by the prumerge vLLM plugin; supported: "
            f"{', '.join(TOWER_CLASSES)}"
        )
    return tower_layout(config, method, tower_class)


def layers_needed(layout: TowerLayout) -> int:
    """Encoder layers the tower must run: up to the feature layer and the attention layer."""
    last = layout.feature_layer
    if layout.attention_layer is not None:
        last = max(last, layout.attention_layer + 1)
    return last


def reduce_patches(
    method: VisionMethod,
    layout: TowerLayout,
    hidden: torch.Tensor,
    pixel_shape: tuple[int, int],
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> tuple[Reduction, torch.Tensor]:
    """Reduce one batch of images' selected-layer features with ``method``.

    Args:
        method: the reduction method.
        layout: from ``layout_of``.
        hidden: (B, P + N, C) hidden states of the feature layer, prefix tokens first.
        pixel_shape: (height, width) of the input images, for the patch grid.
        q: (B, P + N, C) query projections of ``layout.attention_layer`` (attention methods).
        k: (B, P + N, C) key projections of the same layer.

    Returns:
        The method's ``Reduction`` of the N patch tokens (before the projector), and the
        (B, R, C) tokens sent to the LLM unreduced before them (DINOv2's registers; R may be 0).
    """
    grid = (pixel_shape[0] // layout.patch_size, pixel_shape[1] // layout.patch_size)
    out = tower_inputs(layout, method, hidden, q, k, grid)
    return method.reduce(out.inputs), out.passthrough
