"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower pooled to a fixed count, and
bidirectional attention over each image's tokens in the LLM.

The model runs SigLIP (no [CLS] token) on each image at its fixed size, takes the last layer's
output (after the post-layernorm), average-pools the p x p patch grid to
``mm_tokens_per_image`` tokens (16 x 16 = 256 on the released models, k x k patches each),
then RMS-norms and projects them. Pan-and-scan crops reach the model as more images, each
with its own 256 tokens.

Patch tokens: the pooled tokens, before the norm and projection, on the pooled grid; the
norm and projection run on the reduced tokens. Keys and importance: the last SigLIP layer's
q/k (the layer that produces the features), recorded by scoped hooks; the importance is the
mean attention each patch receives (``importance="mean"``; SigLIP has no [CLS], so "cls" is
refused); both are average-pooled over each k x k window exactly as the features are.

The bidirectional image mask: the model makes each run of image tokens (``token_type_ids``
== 1) one block whose tokens attend to each other both ways, on top of the causal mask (and
within the sliding window on sliding layers). The caller's ``token_type_ids`` are cut along
with the placeholders, so each reduced image is one block of exactly its kept tokens, and
the model's own mask code builds the mask from them; without ``token_type_ids`` the model
(and so the patched model) attends causally. Positions: ``compact`` or ``original`` (1-D
RoPE). ``downsample`` is refused: the projector pools the tower's fixed grid. A method that
selects on the projector's outputs (``feature_space="projected"``) gets the pooled tokens
normed and projected, with the pooled tokens beside them as ``tower_features``, and its
tokens reach the LLM as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prumerge.adapters.base import Encoded, FamilyAdapter, register_family
from prumerge.adapters.sequence import Packed
from prumerge.adapters.towers import (
    capture,
    execution_device,
    refuse_tower_merge,
    resolve_importance,
)
from prumerge.errors import PrumergeError
from prumerge.methods import Method, VisionInputs, VisionMethod, projects_first
from prumerge.ops import mean_attention

_MISSING = object()


@register_family
class Gemma3Adapter(FamilyAdapter):
    family = "gemma3"
    object_layer_attention = True
    title = "Gemma 3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    image_inputs = ("pixel_values",)
    consumed_inputs = ("token_type_ids",)

    def __init__(self, model: nn.Module, method: Method, **options: Any) -> None:
        super().__init__(model, method, **options)
        self.tower = model.model.vision_tower
        if type(self.tower).__name__ != "SiglipVisionModel":
            raise PrumergeError(
                f"vision tower {type(self.tower).__name__} is not supported on {self.title}; "
                f"supported: SigLIP (SiglipVisionModel)"
            )
        if isinstance(method, VisionMethod) and method.resizes_input:
            raise PrumergeError(
                f"{method.name} is not supported on {self.title}: its projector pools the "
                f"tower's fixed grid to a fixed count; use pool for a spatial baseline"
            )
        if method.side == "llm":
            raise PrumergeError(
                f"{method.name} is not supported on {self.title}: its decoder normalises q and "
                f"k per head (QK-norm) and its sliding-window layers cache only the last "
                f"{model.config.text_config.sliding_window} tokens, neither of which the "
                f"LLM-side pruning handles"
            )
        refuse_tower_merge(method, f"{self.title}'s projector pools the whole patch grid")
        projector = self.projector
        self.patches_per_side = projector.patches_per_image
        side = projector.tokens_per_side
        self.grid = (side, side)
        self.tokens_per_image = side * side
        self.num_heads = model.config.vision_config.num_attention_heads
        self.importance = resolve_importance(method, has_cls=False, tower_label="SigLIP")
        self.query = self.key = None
        if self.importance is not None:
            attention = self.tower.encoder.layers[-1].self_attn
            self.query, self.key = attention.q_proj, attention.k_proj
        # A second layer's q/k for methods that read two (HiPrune's object layer, 1-based).
        self.object_query = self.object_key = None
        object_layer = getattr(method, "object_layer", None)
        if object_layer is not None:
            layers = self.tower.encoder.layers
            if not 1 <= object_layer <= len(layers):
                raise PrumergeError(
                    f"{method.name}: object_layer={object_layer} is out of range for the "
                    f"{len(layers)}-layer SigLIP tower; supported: 1 to {len(layers)}"
                )
            attention = layers[object_layer - 1].self_attn
            self.object_query, self.object_key = attention.q_proj, attention.k_proj

    # -- vision ------------------------------------------------------------------------
    def placeholder_counts(self, images: dict[str, Any]) -> torch.Tensor:
        return torch.full((self._pixels(images).shape[0],), self.tokens_per_image)

    def _pixels(self, images: dict[str, Any]) -> torch.Tensor:
        pixel_values = images["pixel_values"]
        if pixel_values.ndim != 4:
            raise PrumergeError(
                f"pixel_values must be (images, channels, height, width); got "
                f"{tuple(pixel_values.shape)}"
            )
        return pixel_values

    def _pool(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(I, p * p, C) per-patch values -> (I, t * t, C), averaged over the projector's
        pooling windows as it averages the features."""
        images, _, channels = per_patch.shape
        side = self.patches_per_side
        grid = per_patch.transpose(1, 2).reshape(images, channels, side, side)
        return self.projector.avg_pool(grid.contiguous()).flatten(2).transpose(1, 2)

    def project_tokens(self, pooled: torch.Tensor) -> torch.Tensor:
        """The projector's per-token part (its norm and projection) on (..., C) tokens."""
        projector = self.projector
        normed = projector.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, projector.mm_input_projection_weight).type_as(pooled)

    def encode(self, images: dict[str, Any]) -> Encoded:
        pixel_values = self._pixels(images)
        tower = self.tower
        dtype = next(tower.parameters()).dtype
        pixel_values = pixel_values.to(device=execution_device(tower), dtype=dtype)
        hooks = {"q": self.query, "k": self.key, "oq": self.object_query, "ok": self.object_key}
        with capture(hooks) as captured:
            hidden = tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
        inputs = VisionInputs(features=self._pool(hidden), grid=self.grid, key_heads=self.num_heads)
        if self.importance is not None:
            q, k = captured["q"], captured["k"]  # (I, p * p, C)
            received = mean_attention(q, k, num_heads=self.num_heads)
            inputs.keys = self._pool(k.float())
            inputs.cls_attn = self._pool(received[..., None])[..., 0]
        if "oq" in captured:
            received = mean_attention(captured["oq"], captured["ok"], num_heads=self.num_heads)
            inputs.object_importance = self._pool(received[..., None])[..., 0]
        device = execution_device(self.projector)
        projected_space = projects_first(self.method)
        if projected_space:
            inputs.tower_features = inputs.features
            inputs.features = self.project_tokens(inputs.features.to(device))  # (I, t * t, H)
            inputs.space = "projected"
            if inputs.keys is not None and inputs.cls_attn is not None:
                inputs.keys, inputs.cls_attn = inputs.keys.to(device), inputs.cls_attn.to(device)
        self.add_instruction(inputs, range(inputs.features.shape[0]))
        reduction = self.method.reduce(inputs)
        lengths = reduction.lengths.tolist()
        if all(n == self.tokens_per_image for n in lengths):
            # Nothing removed: the model's own projector, for exact parity.
            projected = self.projector(hidden.to(device))
        elif projected_space:
            projected = reduction.tokens  # the projector's outputs already
        else:
            projected = self.project_tokens(reduction.tokens.to(device))
        return Encoded(
            features=[row[:n] for row, n in zip(projected, lengths, strict=True)],
            tokens_in=[self.tokens_per_image] * len(lengths),
            reductions=[reduction],
            anchors=[a[:n] for a, n in zip(reduction.anchors(), lengths, strict=True)],
            placements=[(0, row) for row in range(len(lengths))],
        )

    # -- generating from inputs_embeds ---------------------------------------------------
    def arm(self, packed: Packed, encoded: Encoded) -> None:
        """Let ``generate`` take ``inputs_embeds``: it refuses them unless the model's
        ``prepare_inputs_for_generation`` names the argument, and Gemma 3's passes it on in
        ``**kwargs`` to the generic one that uses it. A wrapper that names it is put on the
        instance for the call."""
        self.disarm()
        model = self.model
        self._saved_prepare = vars(model).get("prepare_inputs_for_generation", _MISSING)
        original = model.prepare_inputs_for_generation

        def prepare(input_ids: Any, inputs_embeds: Any = None, **kwargs: Any) -> Any:
            return original(input_ids, inputs_embeds=inputs_embeds, **kwargs)

        model.prepare_inputs_for_generation = prepare

    def disarm(self) -> None:
        saved = getattr(self, "_saved_prepare", None)
        if saved is None:
            return
        if saved is _MISSING:
            vars(self.model).pop("prepare_inputs_for_generation", None)
        else:
            self.model.prepare_inputs_for_generation = saved
        self._saved_prepare = None

    # -- the bidirectional image blocks ------------------------------------------------
    def sequence_inputs(self, packed: Packed, images: dict[str, Any]) -> dict[str, torch.Tensor]:
        types = images.get("token_type_ids")
        if types is None:
            return {}
        types = types.to(packed.source.device)
        carried = types.gather(1, packed.source)
        return {"token_type_ids": torch.where(packed.valid, carried, torch.zeros_like(carried))}
