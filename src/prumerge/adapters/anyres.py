"""Anyres images (LLaVA-NeXT, LLaVA-OneVision): several views per image, one budget.

The processor cuts each image into views: a base view (the whole image at the tower's size)
and tiles of a higher-resolution copy. The model stitches the tiles into one grid, removes
the padding the resize added (unpad), on OneVision shrinks grids larger than ``anyres_max_9``
allows (bilinear), and appends an ``image_newline`` token after every row of that grid.

Here the tower runs once on all views; then the model's own ``pack_image_features`` lays out
the patch features together with their keys, importance and a marker channel, so that each
image comes out as two grids, exactly as the model arranges them: the **base view** and the
**high-res view** (all tiles, stitched and unpadded). Each view is reduced on its own grid,
batched with the views of the same shape and budget. A reduced image sends the LLM its base
view's tokens, its high-res view's tokens, and one ``image_newline`` (the token the model
puts after a single-view image) in place of the per-row newlines. An image that no view
reduces keeps the model's exact layout, so ``keep=N`` and ``none`` match the unpatched model.

A method that selects on the projector's outputs (``feature_space="projected"``) gets the
views laid out from the projected patches, as the model itself projects before it packs
(OneVision shrinks large grids after the projector), with the tower features laid out the
same way beside them; its tokens reach the LLM unprojected.

Budgets (``apply(..., budget_per=...)``):

- ``"image"`` (default): ``keep`` counts everything the LLM sees for the image, newline
  included, and a ratio is of the image's unreduced count. The content budget (keep - 1) is
  split over the views in proportion to their patches (largest remainders, at least one
  each). A budget from the image's patch count + 1 up to its full count keeps every patch and
  one newline.
- ``"view"``: every view gets ``keep`` (a ratio is of the view's patches), plus the newline.
- Adaptive methods (PruMerge's IQR rule) choose per view in both modes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prumerge.adapters.base import Encoded, FamilyAdapter
from prumerge.adapters.towers import ViTTower, execution_device
from prumerge.errors import PrumergeError
from prumerge.methods import Method, VisionInputs, projects_first
from prumerge.ops import Reduction
from prumerge.ops.select import budget_count, split_budget


@dataclass
class _View:
    """One grid of one image, before reduction (pre-projector channels)."""

    image: int
    features: torch.Tensor  # (N, C): tower features, or projected ones (N, H)
    keys: torch.Tensor | None  # (N, Ck)
    importance: torch.Tensor | None  # (N,)
    grid: tuple[int, int]
    budget: int | None = None
    out: torch.Tensor | None = None  # (L, C) reduced
    anchors: torch.Tensor | None = None  # (L,) each token's patch in this view
    reduced: bool = False
    tower_features: torch.Tensor | None = None  # (N, C) when ``features`` are projected
    object_importance: torch.Tensor | None = None  # (N,) of the method's ``object_layer``


class AnyresAdapter(FamilyAdapter):
    """Shared by LLaVA-NeXT and LLaVA-OneVision; subclasses say how many views an image has
    and call the model's packing."""

    image_inputs = ("pixel_values", "image_sizes")
    object_layer_attention = True

    def __init__(self, model: nn.Module, method: Method, **options: Any) -> None:
        super().__init__(model, method, **options)
        self.tower = ViTTower(
            model.model.vision_tower,
            model.config,
            method,
            tower_merge_refused=f"{self.title} lays out every view's whole patch grid",
        )
        if self.tower.resizes:
            raise PrumergeError(
                f"{method.name} is not supported on {self.title}: anyres views have the "
                f"tower's fixed size; use pool for a spatial baseline"
            )
        if self.tower.num_passthrough:
            raise PrumergeError(
                f"{self.title} cannot lay out towers with register tokens; supported: CLIP, "
                f"DINOv2 without registers, SigLIP"
            )
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size  # every view is side x side

    # -- family-specific ---------------------------------------------------------------
    def views_per_image(self, images: dict[str, Any]) -> list[int]:
        raise NotImplementedError

    def pack(self, views: list[torch.Tensor], images: dict[str, Any], newline: torch.Tensor):
        """The model's own ``pack_image_features`` on per-image (views, N, C) tensors."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    def _pixels(self, images: dict[str, Any]) -> tuple[torch.Tensor, list[int]]:
        pixel_values = images["pixel_values"]
        if images.get("image_sizes") is None:
            raise PrumergeError(f"{self.title} needs image_sizes (the processor returns them)")
        counts = self.views_per_image(images)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(counts):
                raise PrumergeError(
                    f"pixel_values holds {pixel_values.shape[0]} image(s) but image_sizes "
                    f"{len(counts)}"
                )
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts, strict=True)])
        elif pixel_values.ndim != 4 or pixel_values.shape[0] != sum(counts):
            raise PrumergeError(
                f"pixel_values must be (images, views, channels, height, width) or (views, "
                f"channels, height, width) with {sum(counts)} views; got {tuple(pixel_values.shape)}"
            )
        return pixel_values, counts

    def _layout(self, images: dict[str, Any]) -> list[tuple[int, int] | None]:
        """Per image, its high-res grid (rows, cols), or None for a single-view image."""
        counts = self.views_per_image(images)
        probe = [torch.zeros(n, self.side * self.side, 2) for n in counts]
        newline = torch.tensor([0.0, 1.0])
        grids: list[tuple[int, int] | None] = []
        for packed in self.pack(probe, images, newline):
            rest = packed[self.side * self.side :]
            rows = int(rest[:, 1].sum())
            if rest.shape[0] == rows:  # only the newline after the base view
                grids.append(None)
            else:
                grids.append((rows, rest.shape[0] // rows - 1))
        return grids

    def placeholder_counts(self, images: dict[str, Any]) -> torch.Tensor:
        counts = [
            self.side * self.side + (1 if grid is None else grid[0] * (grid[1] + 1))
            for grid in self._layout(images)
        ]
        return torch.tensor(counts, dtype=torch.long)

    def _views(self, images: dict[str, Any]) -> tuple[list[_View], torch.Tensor, list[int]]:
        """Every image's base and high-res views, with their keys and importance."""
        pixel_values, counts = self._pixels(images)
        out = self.tower.run(pixel_values)
        inputs = out.inputs
        raw = inputs.features
        raw_dtype = raw.dtype
        features = inputs.features  # (V, N, C)
        tower_width = 0
        if projects_first(self.method):
            device = execution_device(self.projector)
            projected = self.projector(features.to(device))  # (V, N, H)
            tower_width = features.shape[-1]
            parts = [projected.float(), features.to(device).float()]
            features = projected
        else:
            device = features.device
            parts = [features.float()]
        width = features.shape[-1]
        key_width = 0 if inputs.keys is None else inputs.keys.shape[-1]
        if inputs.keys is not None and inputs.cls_attn is not None:
            parts += [inputs.keys.to(device).float(), inputs.cls_attn.to(device).float()[..., None]]
        has_object = inputs.object_importance is not None
        if has_object:
            parts.append(inputs.object_importance.to(device).float()[..., None])  # type: ignore[union-attr]
        parts.append(torch.zeros_like(features[..., :1], dtype=torch.float32))  # marker
        stacked = torch.cat(parts, dim=-1)  # (V, N, C + Ck + 1 + 1)
        newline = torch.zeros(stacked.shape[-1], device=stacked.device)
        newline[-1] = 1.0
        per_image = list(torch.split(stacked, counts))
        views: list[_View] = []
        n_base = self.side * self.side
        for image, packed in enumerate(self.pack(per_image, images, newline)):
            rest = packed[n_base:]
            rows = int(rest[:, -1].sum())
            grids = [(packed[:n_base], (self.side, self.side))]
            if rest.shape[0] > rows:
                cols = rest.shape[0] // rows - 1
                hires = rest.view(rows, cols + 1, -1)[:, :cols].reshape(rows * cols, -1)
                grids.append((hires, (rows, cols)))
            for tokens, grid in grids:
                has_attn = key_width > 0
                rest = tokens[:, width + tower_width :]
                views.append(
                    _View(
                        image=image,
                        features=tokens[:, :width].to(features.dtype),
                        keys=rest[:, :key_width] if has_attn else None,
                        importance=rest[:, key_width] if has_attn else None,
                        object_importance=rest[:, key_width + int(has_attn)]
                        if has_object
                        else None,
                        grid=grid,
                        tower_features=tokens[:, width : width + tower_width].to(raw_dtype)
                        if tower_width
                        else None,
                    )
                )
        return views, raw, counts

    def _set_budgets(self, views: list[_View], tokens_in: list[int]) -> None:
        keep = getattr(self.method, "keep", None)
        if self.budget_per == "view" or keep is None or self.method.side == "llm":
            return
        by_image: dict[int, list[_View]] = defaultdict(list)
        for view in views:
            by_image[view.image].append(view)
        for image, own in by_image.items():
            sizes = [v.features.shape[0] for v in own]
            total = budget_count(keep, tokens_in[image])
            if total >= tokens_in[image]:
                budgets = sizes  # nothing to reduce: the model's own layout
            else:
                budgets = split_budget(max(total - 1, len(own)), sizes)
            for view, budget in zip(own, budgets, strict=True):
                view.budget = budget

    def encode(self, images: dict[str, Any]) -> Encoded:
        views, raw, counts = self._views(images)
        tokens_in = self.placeholder_counts(images).tolist()
        self._set_budgets(views, tokens_in)
        groups: dict[tuple, list[_View]] = defaultdict(list)
        for view in views:
            groups[(view.grid, view.budget)].append(view)
        reductions: list[Reduction] = []
        for (grid, budget), members in groups.items():
            has_attn = members[0].keys is not None
            projected = members[0].tower_features is not None
            inputs = VisionInputs(
                features=torch.stack([v.features for v in members]),
                keys=torch.stack([v.keys for v in members]) if has_attn else None,  # type: ignore[misc]
                cls_attn=torch.stack([v.importance for v in members]) if has_attn else None,  # type: ignore[misc]
                grid=grid,
                budget=budget,
                key_heads=self.tower.num_heads if has_attn else None,
                space="projected" if projected else "tower",
                tower_features=torch.stack([v.tower_features for v in members])  # type: ignore[misc]
                if projected
                else None,
                object_importance=torch.stack([v.object_importance for v in members])  # type: ignore[misc]
                if members[0].object_importance is not None
                else None,
            )
            self.add_instruction(inputs, [v.image for v in members])
            reduction = self.method.reduce(inputs)
            reductions.append(reduction)
            for view, tokens, anchors, length in zip(
                members,
                reduction.tokens,
                reduction.anchors(),
                reduction.lengths.tolist(),
                strict=True,
            ):
                view.out = tokens[:length]
                view.anchors = anchors[:length]
                view.reduced = length < view.features.shape[0]
        features = self._assemble(views, raw, counts, images)
        return Encoded(
            features=features,
            tokens_in=tokens_in,
            reductions=reductions,
            anchors=[
                self._anchors([v for v in views if v.image == image], tokens_in[image], len(f))
                for image, f in enumerate(features)
            ],
        )

    def _anchors(self, own: list[_View], total: int, length: int) -> torch.Tensor:
        """Where each of an image's tokens stands in its unreduced run (placeholders)."""
        if length == total:  # the model's own layout
            return torch.arange(total)
        base, parts = own[0].features.shape[0], []
        for view in own:
            assert view.anchors is not None
            if view is own[0]:
                parts.append(view.anchors.cpu())
            else:  # the high-res grid: a newline ends every row of the unreduced run
                cols = view.grid[1]
                patch = view.anchors.cpu()
                parts.append(base + (patch // cols) * (cols + 1) + patch % cols)
        parts.append(torch.tensor([total - 1]))  # the newline stands at the run's end
        return torch.cat(parts)

    def _assemble(
        self,
        views: list[_View],
        raw: torch.Tensor,
        counts: list[int],
        images: dict[str, Any],
    ) -> list[torch.Tensor]:
        """Each image's tokens for the LLM: the model's layout if no view was reduced, else
        base tokens, high-res tokens and one newline."""
        projector = self.projector
        device = execution_device(projector)
        newline = self.model.model.image_newline
        untouched = {
            image: all(not v.reduced for v in views if v.image == image)
            for image in range(len(counts))
        }
        full: list[torch.Tensor] | None = None
        if any(untouched.values()):
            # Project first, then pack, as the model does (OneVision interpolates after the
            # projector, so the order matters for exact parity).
            projected = projector(raw.to(device))
            full = self.pack(list(torch.split(projected, counts)), images, newline)
        result = []
        for image in range(len(counts)):
            if untouched[image]:
                assert full is not None
                result.append(full[image])
                continue
            own = torch.cat([v.out for v in views if v.image == image])  # type: ignore[misc]
            # Tokens of a projected-space method are the projector's outputs already.
            tokens = own if projects_first(self.method) else projector(own.to(device))
            result.append(torch.cat([tokens, newline[None].to(tokens)]))
        return result
