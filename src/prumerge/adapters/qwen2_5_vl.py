"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``) and Qwen2-VL
(``Qwen2VLForConditionalGeneration``): native-resolution images, no [CLS], M-RoPE.

Patch tokens: the PatchMerger's output, one token per 2x2 group of ViT patches, in the raster
order of the merged grid (h/2, w/2); reducing before the merger would break its groups. The
merger is the projector, so these are projected tokens for every method (``space="projected"``,
no ``tower_features``), and methods that select on the projector's outputs need nothing more.
Importance: the mean attention each ViT patch receives in the last full-attention block
(Qwen2.5-VL's other blocks attend within windows only), recorded by scoped hooks on that
block's attention and its fused ``qkv`` projection (rotary embeddings applied, as the block
does), then averaged over each merger group; keys likewise. Token 0 is a patch like any other:
there is no [CLS], so ``importance="cls"`` is refused. Qwen2.5-VL's blocks see the tokens in
window order; the window index maps the groups back to raster order.

Reduced tokens: each image's run of placeholders is cut to its reduced count, and every kept
token keeps its original 3-D rope index (the model's ``get_rope_index`` on the unreduced
prompt), text after an image included; decoding continues from there. Videos are refused.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
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
from prumerge.methods import Method, VisionInputs, VisionMethod
from prumerge.ops import Reduction, mean_attention


@register_family
class Qwen25VLAdapter(FamilyAdapter):
    family = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    image_inputs = ("pixel_values", "image_grid_thw")
    consumed_inputs = ("mm_token_type_ids",)
    refused_inputs = ("pixel_values_videos", "video_grid_thw")
    mrope = True
    windowed = True
    object_layer_attention = True

    def __init__(self, model: nn.Module, method: Method, **options: Any) -> None:
        super().__init__(model, method, **options)
        visual = model.model.visual
        vision = model.config.vision_config
        self.visual = visual
        self.merge = vision.spatial_merge_size
        self.patch_size = vision.patch_size
        self.temporal_patch_size = vision.temporal_patch_size
        refuse_tower_merge(method, f"{self.title}'s PatchMerger needs every 2x2 patch group")
        self.importance = resolve_importance(method, has_cls=False, tower_label=self.title)
        self.resizes = isinstance(method, VisionMethod) and method.resizes_input
        full = list(getattr(vision, "fullatt_block_indexes", None) or []) if self.windowed else []
        index = full[-1] if full else len(visual.blocks) - 1
        self.attention = visual.blocks[index].attn
        module = inspect.getmodule(type(self.attention))
        self.rotary = getattr(module, "apply_rotary_pos_emb_vision", None)
        if self.rotary is None or not hasattr(self.attention, "qkv"):
            raise PrumergeError(f"cannot find the attention of {type(visual).__name__}")
        # A second block's attention for methods that read two (HiPrune's object layer,
        # 1-based as the release's ``attn_list[l - 1]``); a windowed block's attention stays
        # within its windows, as the block computes it.
        object_layer = getattr(method, "object_layer", None)
        self.object_attention: nn.Module | None = None
        self.object_windowed = False
        if object_layer is not None:
            blocks = len(visual.blocks)
            if not 1 <= object_layer <= blocks:
                raise PrumergeError(
                    f"{method.name}: object_layer={object_layer} is out of range for the "
                    f"{blocks}-block {self.title} ViT; supported: 1 to {blocks}"
                )
            self.object_attention = visual.blocks[object_layer - 1].attn
            self.object_windowed = self.windowed and object_layer - 1 not in full

    @property
    def projector(self) -> nn.Module:
        return self.visual.merger

    def _grids(self, images: dict[str, Any]) -> torch.Tensor:
        grid = images.get("image_grid_thw")
        if grid is None:
            raise PrumergeError(f"{self.title} needs image_grid_thw (the processor returns it)")
        if bool((grid[:, 0] != 1).any()):
            raise PrumergeError(f"{self.title}: images must have one temporal patch (t=1)")
        return grid

    def placeholder_counts(self, images: dict[str, Any]) -> torch.Tensor:
        grid = self._grids(images).cpu()
        return (grid.prod(dim=-1) // self.merge**2).long()

    # -- vision ------------------------------------------------------------------------
    def encode(self, images: dict[str, Any]) -> Encoded:
        grid = self._grids(images)
        pixel_values = images["pixel_values"]
        tokens_in = self.placeholder_counts(images).tolist()
        if self.resizes:
            pixel_values, grid = self._downsample(pixel_values, grid)
        visual = self.visual
        dtype = next(visual.parameters()).dtype
        pixel_values = pixel_values.to(device=execution_device(visual), dtype=dtype)
        grid = grid.to(pixel_values.device)
        hooks: dict[str, nn.Module | None] = {}
        captured_inputs: dict[str, Any] = {}
        handle = None
        if self.importance is not None:
            hooks["qkv"] = self.attention.qkv
            if self.object_attention is not None:
                hooks["object_qkv"] = self.object_attention.qkv

            def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured_inputs["position_embeddings"] = kwargs.get("position_embeddings")

            handle = self.attention.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with capture(hooks) as captured:
                merged = visual(pixel_values, grid_thw=grid).pooler_output  # (sum G, H)
        finally:
            if handle is not None:
                handle.remove()
        counts = (grid.prod(dim=-1) // self.merge**2).tolist()
        per_image = list(torch.split(merged, counts))
        keys = importance = objects = None
        if self.importance is not None:
            position_embeddings = captured_inputs["position_embeddings"]  # every block's
            keys, importance = self._pooled_attention(captured["qkv"], position_embeddings, grid)
        if "object_qkv" in captured:
            _, objects = self._pooled_attention(
                captured["object_qkv"], position_embeddings, grid, windowed=self.object_windowed
            )
        features: list[torch.Tensor | None] = [None] * len(counts)
        anchors: list[torch.Tensor | None] = [None] * len(counts)
        placements: list[tuple[int, int]] = [(0, 0)] * len(counts)
        reductions: list[Reduction] = []
        llm_grids = [(int(h) // self.merge, int(w) // self.merge) for _, h, w in grid.tolist()]
        for shape in dict.fromkeys(llm_grids):  # images of one grid shape go together
            members = [i for i, g in enumerate(llm_grids) if g == shape]
            # The merger is the projector: every method, whatever its feature_space, sees
            # its outputs, and they go to the LLM as the method returns them.
            inputs = VisionInputs(
                features=torch.stack([per_image[i] for i in members]),
                grid=shape,
                space="projected",
            )
            if keys is not None and importance is not None:
                inputs.keys = torch.stack([keys[i] for i in members])
                inputs.cls_attn = torch.stack([importance[i] for i in members])
                inputs.key_heads = self.attention.num_heads
            if objects is not None:
                inputs.object_importance = torch.stack([objects[i] for i in members])
            self.add_instruction(inputs, members)
            reduction = self.method.reduce(inputs)
            reductions.append(reduction)
            for i, tokens, anchor, length in zip(
                members,
                reduction.tokens,
                reduction.anchors(),
                reduction.lengths.tolist(),
                strict=True,
            ):
                placements[i] = (len(reductions) - 1, members.index(i))
                features[i] = tokens[:length]
                anchors[i] = anchor[:length]  # merger groups are the placeholders, in raster order
        self._last_grid = grid
        return Encoded(
            features=features,  # type: ignore[arg-type]
            tokens_in=tokens_in,
            reductions=reductions,
            anchors=anchors,  # type: ignore[arg-type]
            placements=placements,
        )

    def _window_index(self, grid: torch.Tensor) -> torch.Tensor | None:
        """Window order -> raster order of the merger groups (Qwen2.5-VL), or None."""
        if not self.windowed:
            return None
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        index, _ = get_vision_window_index(
            grid,
            spatial_merge_size=self.merge,
            window_size=vision.window_size,
            patch_size=self.patch_size,
        )
        return index.to(grid.device)

    def _pooled_attention(
        self,
        qkv: torch.Tensor,
        position_embeddings: Any,
        grid: torch.Tensor,
        *,
        windowed: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image, the (G, C) keys and (G,) mean attention received, per merger group in
        raster order. ``windowed``: the block attends within Qwen2.5-VL's windows only, so
        each token receives attention from its window's queries (their sum, over the image's
        token count: the full blocks' scale)."""
        heads = self.attention.num_heads
        length = qkv.shape[0]
        q, k, _ = qkv.reshape(length, 3, heads, -1).unbind(1)  # (T, h, D) each
        cos, sin = position_embeddings
        q, k = self.rotary(q, k, cos, sin)
        sizes = grid.prod(dim=-1).tolist()
        longest = max(sizes)
        group = self.merge**2
        # Images side by side, padded to the longest: (I, T_max, h*D).
        qs = torch.zeros(len(sizes), longest, q.shape[1] * q.shape[2], device=q.device)
        ks = torch.zeros_like(qs)
        valid = torch.zeros(len(sizes), longest, dtype=torch.bool, device=q.device)
        starts = [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]
        for i, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            qs[i, :size] = q[start : start + size].flatten(1).float()
            ks[i, :size] = k[start : start + size].flatten(1).float()
            valid[i, :size] = True
        if windowed:
            received = self._windowed_attention(q.flatten(1), k.flatten(1), grid, sizes, longest)
        else:
            received = mean_attention(qs, ks, num_heads=heads, valid=valid)  # (I, T_max)
        window = self._window_index(grid)
        keys, importance = [], []
        first_group = 0
        for i, size in enumerate(sizes):
            groups = size // group
            key = ks[i, :size].view(groups, group, -1).mean(dim=1)  # (G, C), block order
            score = received[i, :size].view(groups, group).mean(dim=1)  # (G,)
            if window is not None:
                raster = window[first_group : first_group + groups] - first_group
                key = torch.empty_like(key).index_copy_(0, raster, key)
                score = torch.empty_like(score).index_copy_(0, raster, score)
            keys.append(key)
            importance.append(score)
            first_group += groups
        return keys, importance

    def _windowed_attention(
        self, q: torch.Tensor, k: torch.Tensor, grid: torch.Tensor, sizes: list[int], longest: int
    ) -> torch.Tensor:
        """(I, T_max) attention each token receives within its window, summed over the
        window's queries and divided by the image's token count; q, k (T, C) in the blocks'
        window order."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        _, bounds = get_vision_window_index(
            grid,
            spatial_merge_size=self.merge,
            window_size=vision.window_size,
            patch_size=self.patch_size,
        )
        edges = torch.unique_consecutive(torch.as_tensor(bounds, device=q.device))
        lengths = edges[1:] - edges[:-1]  # (W,) tokens per window
        widest = int(lengths.max())
        window = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)
        slot = torch.arange(q.shape[0], device=q.device) - edges[:-1][window]
        qs = q.new_zeros(lengths.numel(), widest, q.shape[1]).float()
        ks = torch.zeros_like(qs)
        valid = torch.zeros(lengths.numel(), widest, dtype=torch.bool, device=q.device)
        qs[window, slot], ks[window, slot], valid[window, slot] = q.float(), k.float(), True
        within = mean_attention(qs, ks, num_heads=self.attention.num_heads, valid=valid)
        per_token = within[window, slot] * lengths[window].float()  # summed over the window
        out = torch.zeros(len(sizes), longest, device=q.device)
        start = 0
        for i, size in enumerate(sizes):
            out[i, :size] = per_token[start : start + size] / size
            start += size
        return out

    def _downsample(
        self, pixel_values: torch.Tensor, grid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image resized so that its merged grid is the method's target grid."""
        m, p, tp = self.merge, self.patch_size, self.temporal_patch_size
        images, grids = [], []
        start = 0
        for _, h, w in grid.tolist():
            rows = pixel_values[start : start + h * w]
            start += h * w
            channels = rows.shape[1] // (tp * p * p)
            # Undo the processor's patch layout: (h/m, w/m, m, m, C, t, p, p), one frame.
            patches = rows.view(h // m, w // m, m, m, channels, tp, p, p)[:, :, :, :, :, 0]
            image = patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(channels, h * p, w * p)
            out_rows, out_cols = self.method.target_grid(h // m, w // m)  # type: ignore[attr-defined]
            new_h, new_w = out_rows * m, out_cols * m
            if (new_h, new_w) != (h, w):
                image = F.interpolate(
                    image[None].float(),
                    size=(new_h * p, new_w * p),
                    mode="bilinear",
                    antialias=True,
                )[0].to(rows.dtype)
            resized = image.reshape(channels, new_h // m, m, p, new_w // m, m, p)
            resized = resized.permute(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
            resized = resized.expand(-1, -1, -1, -1, -1, tp, -1, -1)
            images.append(resized.reshape(new_h * new_w, channels * tp * p * p))
            grids.append([1, new_h, new_w])
        return torch.cat(images), torch.tensor(grids, dtype=grid.dtype, device=grid.device)

    # -- positions ---------------------------------------------------------------------
    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = (input_ids == self.image_token_id).int()
        video = getattr(self.model.config, "video_token_id", None)
        if video is not None:
            types = types + 2 * (input_ids == video).int()
        return types

    def rope_positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: dict[str, Any],
    ) -> torch.Tensor:
        types = images.get("mm_token_type_ids")
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=self._token_types(input_ids)
            if types is None
            else types.to(input_ids.device),
            image_grid_thw=self._grids(images).to(input_ids.device),
            attention_mask=attention_mask,
        )
        return positions

    def resized_rope_positions(self, packed: Packed) -> torch.Tensor:
        # The model sees smaller images: their own rope indices, on the shrunk prompt.
        positions, _ = self.model.model.get_rope_index(
            packed.input_ids,
            mm_token_type_ids=self._token_types(packed.input_ids),
            image_grid_thw=self._last_grid.to(packed.input_ids.device),
            attention_mask=packed.attention_mask,
        )
        return positions


@register_family
class Qwen2VLAdapter(Qwen25VLAdapter):
    """Qwen2-VL: the same layout without windowed attention (every block attends fully)."""

    family = "qwen2_vl"
    title = "Qwen2-VL"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    windowed = False
