"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): native-resolution images, no [CLS],
interleaved M-RoPE, and DeepStack.

Patch tokens, grid, keys and importance are read as on Qwen2-VL (``qwen2_5_vl``): the
PatchMerger's output, one token per 2x2 group of ViT patches in raster order of the merged
grid; the mean attention each patch receives in the last ViT block (every block attends over
the whole image), with the block's rotary embedding applied, averaged over each merger group;
keys likewise. There is no [CLS] token, so ``importance="cls"`` is refused.

DeepStack: the ViT also sends the LLM the merged features of a few earlier blocks
(``deepstack_visual_indexes``), which the decoder adds to the hidden states at the image
positions after each of its first layers. A reduced image must send them for its kept tokens
only, in the same order, or the decoder adds features to the wrong tokens. Here they follow
the reduction token for token (``prumerge.ops.follow.follow_reduction``): a kept token gets
its own group's DeepStack features, exactly; a merged token the mean over the groups merged
into it. A scoped pre-hook on the decoder hands them over, with the mask of the shortened
prompt's image positions, in the call's first forward pass (expanded for beams).

Positions: every kept token keeps its original 3-D index from the model's own
``get_rope_index`` on the unreduced prompt (interleaved M-RoPE reads the same indices), text
after an image keeps its index, and decoding continues from there. Videos (whose frames
Qwen3-VL separates with timestamps) are refused.

LLM-side methods whose first pruned layer is one of the DeepStack layers are refused: the
decoder would add the features to a sequence that no longer has those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prumerge.adapters.base import Encoded, register_family
from prumerge.adapters.qwen2_5_vl import Qwen2VLAdapter
from prumerge.adapters.sequence import Packed
from prumerge.adapters.towers import capture
from prumerge.errors import PrumergeError
from prumerge.methods import Method
from prumerge.ops.follow import follow_reduction


@dataclass
class _Armed:
    """The DeepStack inputs of one call over its shortened prompt."""

    mask: torch.Tensor  # (B, L') True at image positions
    features: list[torch.Tensor]  # per DeepStack layer, (image positions, H) in mask order


@register_family
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    title = "Qwen3-VL"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    # Its ViT's second-layer attention is not recorded (HiPrune refuses it in one line).
    object_layer_attention = False

    def __init__(self, model: nn.Module, method: Method, **options: Any) -> None:
        super().__init__(model, method, **options)
        self.deepstack_mergers = list(getattr(self.visual, "deepstack_merger_list", []))
        depth = len(self.deepstack_mergers)
        first = getattr(method, "layer", None)
        if method.side == "llm" and isinstance(first, int) and first < depth:
            raise PrumergeError(
                f"{method.name} prunes from LLM layer {first}, but Qwen3-VL adds DeepStack "
                f"features to the image positions after layers 0-{depth - 1}; supported: "
                f"layer >= {depth}"
            )
        if method.side == "llm" and hasattr(self.language_model.layers[0].self_attn, "q_norm"):
            raise PrumergeError(
                f"{method.name} is not supported on {self.title}: its decoder normalises q and "
                f"k per head (QK-norm), which the LLM-side attention read does not apply"
            )
        self._deepstack: list[list[torch.Tensor]] = []  # per image, per layer: (L_i, H)
        #: Per image of the last call, ``(group, row)``: its row of ``Handle.last_reductions``.
        self.last_placements: list[tuple[int, int]] = []
        self._armed: _Armed | None = None
        self._hook: Any = None

    # -- vision ------------------------------------------------------------------------
    def encode(self, images: dict[str, Any]) -> Encoded:
        mergers = {str(i): m for i, m in enumerate(self.deepstack_mergers)}
        with capture(mergers) as captured:  # type: ignore[arg-type]
            encoded = super().encode(images)
        counts = (self._last_grid.prod(dim=-1) // self.merge**2).tolist()
        # Per layer, per image: (G_i, H) DeepStack features of the merger groups.
        layers = [list(torch.split(captured[str(i)], counts)) for i in range(len(mergers))]
        followed: dict[tuple[int, int], list[torch.Tensor]] = {}
        for group, reduction in enumerate(encoded.reductions):
            members = [i for i, (g, _) in enumerate(encoded.placements) if g == group]
            for layer in layers:
                side = torch.stack([layer[i] for i in members])  # (B_g, G, H)
                for row, out in enumerate(follow_reduction(reduction, side)):
                    followed.setdefault((group, row), []).append(out)
        self._deepstack = [
            [out[: len(feature)] for out in followed.get(place, [])]
            for place, feature in zip(encoded.placements, encoded.features, strict=True)
        ]
        self.last_placements = encoded.placements
        return encoded

    def deepstack_features(self) -> list[list[torch.Tensor]]:
        """Per image of the last call, per DeepStack layer: the (L_i, H) features of its
        reduced tokens, in the order of its tokens."""
        return self._deepstack

    # -- the decoder's DeepStack inputs --------------------------------------------------
    def arm(self, packed: Packed, encoded: Encoded) -> None:
        self.disarm()
        if not self.deepstack_mergers:
            return
        mask = (packed.input_ids == self.image_token_id) & packed.valid
        features = [
            torch.cat([image[layer] for image in self._deepstack])
            for layer in range(len(self.deepstack_mergers))
        ]
        self._armed = _Armed(mask=mask, features=features)
        decoder = self.language_model
        self._hook = decoder.register_forward_pre_hook(self._inject, with_kwargs=True)

    def disarm(self) -> None:
        self._armed = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _inject(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        armed = self._armed
        embeds = kwargs.get("inputs_embeds")
        if armed is None or embeds is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            return None  # decoding: the image positions are already in the cache
        batch, length = embeds.shape[:2]
        rows, prompt = armed.mask.shape
        if length != prompt or batch % rows:
            raise PrumergeError(
                f"{self.title}: the first forward pass must see the whole prompt "
                f"({rows} x {prompt} tokens) for DeepStack; got {batch} x {length}"
            )
        repeat = batch // rows  # beams and num_return_sequences repeat each row in place
        mask = armed.mask.to(embeds.device)
        # Which image position (in mask order) every position of every row is.
        ordinal = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
        mask = mask.repeat_interleave(repeat, dim=0)
        ordinal = ordinal.repeat_interleave(repeat, dim=0)
        kwargs["visual_pos_masks"] = mask
        take = ordinal[mask]
        kwargs["deepstack_visual_embeds"] = [f.to(embeds.device)[take] for f in armed.features]
        return args, kwargs
