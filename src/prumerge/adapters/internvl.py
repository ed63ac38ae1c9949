"""InternVL3 (``InternVLForConditionalGeneration``): tiles and a thumbnail, and a
pixel-shuffle projector.

The processor cuts each image into up to ``max_patches`` tiles of the tower's size and, when
there are several, adds a thumbnail of the whole image as the last tile; the LLM sees every
tile's tokens one after the other, with no separator, inside the image's ``<img>...</img>``.
The model runs its InternViT on every tile, drops [CLS] (``vision_feature_select_strategy=
"default"``), and pixel-shuffles each tile's s x s patch grid into (s/2) x (s/2) tokens of
four patches each (``downsample_ratio=0.5``) before the MLP projector.

Patch tokens: the pixel-shuffled tokens of each tile, before the projector, on the tile's
(s/2) x (s/2) grid; every tile is a view, reduced on its own grid, and the projector runs on
the reduced tokens. Keys and importance: one ViT layer's q/k, after its q/k norms (InternViT-6B
has them), recorded by scoped hooks, then averaged over each pixel-shuffle group of patches
(the model's own ``pixel_shuffle`` groups them, so the groups are the model's). The layer is
the one that consumes the selected features, or, for the last layer's output (InternVL3's
``vision_feature_layer=-1``), the layer that produces them.

Importance: ``importance="mean"`` is the default here, although InternViT has a [CLS] token
(``"cls"`` is offered, from the same layer). InternVL never shows the LLM that token: it was
trained for a contrastive loss in the vision-only stage and dropped for the pixel shuffle, and
a FasterVLM user measured [CLS]-attention top-k below random pruning on InternVL2-26B
(TextVQA at 95% pruning: 26.6% of full against random's 42.9%).

Tiles per image: ``num_patches`` (the image processor's count, which the processor itself
pops) when given; otherwise read off the prompt, where each image is one run of placeholders
(the processor wraps every image in ``<img>...</img>``). Budgets (``budget_per``): ``"image"``
(default) splits an image's budget over its tiles in proportion to their tokens (largest
remainders, at least one each); ``"view"`` gives every tile the budget. Adaptive methods
choose per tile. Positions: ``compact`` or ``original``, as on LLaVA-1.5 (the LLM's RoPE is
1-D). A method that selects on the projector's outputs (``feature_space="projected"``) gets
every tile's tokens projected (the projector works token by token), with the pixel-shuffled
tokens beside them as ``tower_features``, and its tokens reach the LLM as they are.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prumerge.adapters.base import Encoded, FamilyAdapter, register_family
from prumerge.adapters.towers import capture, execution_device, refuse_tower_merge
from prumerge.errors import PrumergeError
from prumerge.methods import Method, VisionInputs, VisionMethod, projects_first
from prumerge.ops import Reduction, cls_attention, mean_attention
from prumerge.ops.select import budget_count, split_budget


@register_family
class InternVLAdapter(FamilyAdapter):
    family = "internvl"
    object_layer_attention = True
    title = "InternVL"
    model_classes = ("InternVLForConditionalGeneration",)
    image_inputs = ("pixel_values",)
    consumed_inputs = ("num_patches",)

    def __init__(self, model: nn.Module, method: Method, **options: Any) -> None:
        super().__init__(model, method, **options)
        config = model.config
        self.tower = model.model.vision_tower
        if type(self.tower).__name__ != "InternVLVisionModel":
            raise PrumergeError(
                f"vision tower {type(self.tower).__name__} is not supported on {self.title}; "
                f"supported: InternViT (InternVLVisionModel)"
            )
        if isinstance(method, VisionMethod) and method.resizes_input:
            raise PrumergeError(
                f"{method.name} is not supported on {self.title}: its tiles have the tower's "
                f"fixed size; use pool for a spatial baseline"
            )
        refuse_tower_merge(method, f"{self.title}'s pixel shuffle needs every 2x2 patch group")
        strategy = config.vision_feature_select_strategy
        if strategy != "default":
            raise PrumergeError(
                f"vision_feature_select_strategy={strategy!r} is not handled on {self.title}; "
                f"supported: 'default' (patch tokens without [CLS])"
            )
        layer = config.vision_feature_layer
        vision = config.vision_config
        num_layers = vision.num_hidden_layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise PrumergeError(
                f"vision_feature_layer={layer!r} is not handled; supported: a single int layer"
            )
        if not -(num_layers + 1) <= layer <= num_layers:
            raise PrumergeError(
                f"vision_feature_layer={layer} is out of range for a {num_layers}-layer tower"
            )
        self.feature_layer = layer
        self.ratio = config.downsample_ratio
        self.group = round(1 / self.ratio) ** 2  # patches per pixel-shuffled token
        size, patch = vision.image_size, vision.patch_size
        side = (size[0] if isinstance(size, list | tuple) else size) // (
            patch[0] if isinstance(patch, list | tuple) else patch
        )
        self.grid = (round(side * self.ratio), round(side * self.ratio))
        self.tokens_per_tile = self.grid[0] * self.grid[1]
        self.num_heads = vision.num_attention_heads
        self.importance = self._resolve_importance(method)
        self.query = self.key = None
        if self.importance is not None:
            index = layer % (num_layers + 1)  # into hidden_states: embeddings, then layers
            source = getattr(method, "attention_source", "consumer")
            attention_layer = index if source == "consumer" and index < num_layers else index - 1
            if attention_layer < 0:
                raise PrumergeError(
                    f"vision_feature_layer={layer} selects the embeddings: no encoder layer "
                    f"produces them, so {method.name} has no attention to use"
                )
            attention = self.tower.encoder.layer[attention_layer].attention
            # The q/k norms (identities without use_qk_norm) give q and k as attention uses them.
            self.query, self.key = attention.q_norm, attention.k_norm
            self.attention_layer = attention_layer
        # A second layer's q/k for methods that read two (HiPrune's object layer, 1-based).
        self.object_query = self.object_key = None
        object_layer = getattr(method, "object_layer", None)
        if object_layer is not None:
            if not 1 <= object_layer <= num_layers:
                raise PrumergeError(
                    f"{method.name}: object_layer={object_layer} is out of range for the "
                    f"{num_layers}-layer InternViT; supported: 1 to {num_layers}"
                )
            attention = self.tower.encoder.layer[object_layer - 1].attention
            self.object_query, self.object_key = attention.q_norm, attention.k_norm

    def _resolve_importance(self, method: Method) -> str | None:
        if not method.needs_attention:
            return None
        wanted = getattr(method, "importance", "auto")  # checked by the method
        return "mean" if wanted == "auto" else wanted

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    # -- tiles -------------------------------------------------------------------------
    def bind_prompt(self, input_ids: torch.Tensor, images: dict[str, Any]) -> dict[str, Any]:
        if images.get("num_patches") is not None:
            return images
        is_image = input_ids == self.image_token_id  # (B, L)
        starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]  # a run starts (rows apart)
        run = (starts.flatten().long().cumsum(0) - 1).view_as(is_image)
        lengths = torch.bincount(run[is_image], minlength=int(starts.sum()))
        if bool((lengths % self.tokens_per_tile).any()):
            raise PrumergeError(
                f"the prompt's image runs hold {lengths.tolist()} placeholders, not multiples "
                f"of the {self.tokens_per_tile} tokens of a tile; build the inputs with the "
                f"model's processor"
            )
        return {**images, "num_patches": (lengths // self.tokens_per_tile).tolist()}

    def _tiles(self, images: dict[str, Any]) -> list[int]:
        tiles = images.get("num_patches")
        pixel_values = images["pixel_values"]
        if tiles is None:
            raise PrumergeError(
                f"{self.title} needs each image's tile count: give the prompt (input_ids) or "
                f"num_patches (the image processor returns it)"
            )
        tiles = [int(n) for n in (tiles.tolist() if torch.is_tensor(tiles) else tiles)]
        if pixel_values.ndim != 4 or pixel_values.shape[0] != sum(tiles) or min(tiles) < 1:
            raise PrumergeError(
                f"pixel_values must be (tiles, channels, height, width) with {sum(tiles)} tiles "
                f"({tiles} per image); got {tuple(pixel_values.shape)}"
            )
        return tiles

    def placeholder_counts(self, images: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(self._tiles(images), dtype=torch.long) * self.tokens_per_tile

    # -- vision ------------------------------------------------------------------------
    def _shuffle(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(T, N, C) per-patch values -> (T, n, group, C), grouped as the model's
        ``pixel_shuffle`` groups them into its n tokens."""
        tiles, num, channels = per_patch.shape
        side = round(num**0.5)
        shuffled = self.model.model.pixel_shuffle(
            per_patch.reshape(tiles, side, side, channels), scale_factor=self.ratio
        )  # (T, s/2, s/2, group * C): the group's patches one after the other
        return shuffled.reshape(tiles, -1, self.group, channels)

    def _run(self, pixel_values: torch.Tensor) -> VisionInputs:
        """All tiles through the tower: pixel-shuffled tokens (T, n, group * C), with pooled
        keys and importance."""
        dtype = next(self.tower.parameters()).dtype
        pixel_values = pixel_values.to(device=execution_device(self.tower), dtype=dtype)
        hooks = {"q": self.query, "k": self.key, "oq": self.object_query, "ok": self.object_key}
        with capture(hooks) as captured:
            out = self.tower(
                pixel_values=pixel_values,
                output_hidden_states=self.feature_layer != -1,
                return_dict=True,
            )
        hidden = out.last_hidden_state if self.feature_layer == -1 else None
        if hidden is None:
            hidden = out.hidden_states[self.feature_layer]
        patches = hidden[:, 1:]  # (T, N, C), [CLS] dropped as the model does
        tokens = self._shuffle(patches).flatten(2)  # (T, n, group * C), the model's layout
        inputs = VisionInputs(features=tokens, grid=self.grid, key_heads=self.num_heads)
        if self.importance is not None:
            q, k = captured["q"], captured["k"]  # (T, 1 + N, C)
            if self.importance == "cls":
                score = cls_attention(
                    q,
                    k,
                    num_heads=self.num_heads,
                    mode=getattr(self.method, "attention_mode", "multihead"),  # type: ignore[arg-type]
                )
            else:
                score = mean_attention(q, k, num_heads=self.num_heads, num_prefix_tokens=1)
            inputs.keys = self._shuffle(k[:, 1:].float()).mean(dim=2)  # (T, n, Ck)
            inputs.cls_attn = self._shuffle(score[..., None]).mean(dim=(2, 3))  # (T, n)
        if "oq" in captured:
            score = mean_attention(
                captured["oq"], captured["ok"], num_heads=self.num_heads, num_prefix_tokens=1
            )
            inputs.object_importance = self._shuffle(score[..., None]).mean(dim=(2, 3))
        return inputs

    def _budgets(self, tiles: list[int], tokens_in: list[int]) -> list[int | None]:
        """Per tile, the exact count it keeps, or None where the method's own rule applies."""
        keep = getattr(self.method, "keep", None)
        per_tile: list[int | None] = []
        for count, total_in in zip(tiles, tokens_in, strict=True):
            if self.budget_per == "view" or keep is None or self.method.side == "llm":
                per_tile += [None] * count
                continue
            total = budget_count(keep, total_in)
            sizes = [self.tokens_per_tile] * count
            per_tile += sizes if total >= total_in else split_budget(max(total, count), sizes)
        return per_tile

    def encode(self, images: dict[str, Any]) -> Encoded:
        tiles = self._tiles(images)
        tokens_in = [n * self.tokens_per_tile for n in tiles]
        inputs = self._run(images["pixel_values"])
        raw = inputs.features  # (T, n, group * C)
        projected_space = projects_first(self.method)
        if projected_space:
            device = execution_device(self.projector)
            inputs.tower_features = raw
            inputs.features = self.projector(raw.to(device))  # (T, n, H)
            if inputs.keys is not None and inputs.cls_attn is not None:
                inputs.keys, inputs.cls_attn = inputs.keys.to(device), inputs.cls_attn.to(device)
        budgets = self._budgets(tiles, tokens_in)
        image_of_tile = [i for i, n in enumerate(tiles) for _ in range(n)]
        groups: dict[int | None, list[int]] = defaultdict(list)
        for tile, budget in enumerate(budgets):
            groups[budget].append(tile)
        outs: list[torch.Tensor] = [inputs.features[0, :0]] * len(budgets)
        anchors: list[torch.Tensor] = [torch.arange(0)] * len(budgets)
        reduced = [False] * len(budgets)
        reductions: list[Reduction] = []
        for budget, members in groups.items():
            index = torch.tensor(members, device=inputs.features.device)
            batch = VisionInputs(
                features=inputs.features[index.to(inputs.features.device)],
                keys=None if inputs.keys is None else inputs.keys[index.to(inputs.keys.device)],
                cls_attn=None
                if inputs.cls_attn is None
                else inputs.cls_attn[index.to(inputs.cls_attn.device)],
                grid=self.grid,
                budget=budget,
                key_heads=self.num_heads,
                space="projected" if projected_space else "tower",
                tower_features=None if not projected_space else raw[index.to(raw.device)],
            )
            if inputs.object_importance is not None:
                objects = inputs.object_importance
                batch.object_importance = objects[index.to(objects.device)].to(
                    batch.features.device
                )
            self.add_instruction(batch, [image_of_tile[t] for t in members])
            reduction = self.method.reduce(batch)
            reductions.append(reduction)
            for tile, tokens, anchor, length in zip(
                members,
                reduction.tokens,
                reduction.anchors(),
                reduction.lengths.tolist(),
                strict=True,
            ):
                outs[tile], anchors[tile] = tokens[:length], anchor[:length].cpu()
                reduced[tile] = length < self.tokens_per_tile
        features, image_anchors = self._assemble(raw, tiles, outs, anchors, reduced)
        return Encoded(
            features=features, tokens_in=tokens_in, reductions=reductions, anchors=image_anchors
        )

    def _assemble(
        self,
        raw: torch.Tensor,
        tiles: list[int],
        outs: list[torch.Tensor],
        anchors: list[torch.Tensor],
        reduced: list[bool],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each image's tiles, one after the other, projected: as the model projects them
        (all tiles at once) where no tile was reduced, else the reduced tokens."""
        projector = self.projector
        device = execution_device(projector)
        starts = [0, *torch.tensor(tiles).cumsum(0).tolist()[:-1]]
        untouched = [not any(reduced[s : s + n]) for s, n in zip(starts, tiles, strict=True)]
        full = projector(raw.to(device)) if any(untouched) else None  # (T, n, H)
        features, image_anchors = [], []
        for start, count, whole in zip(starts, tiles, untouched, strict=True):
            own = range(start, start + count)
            if whole:
                assert full is not None
                features.append(full[start : start + count].flatten(0, 1))
                image_anchors.append(torch.arange(count * self.tokens_per_tile))
                continue
            tokens = torch.cat([outs[t] for t in own])
            # Tokens of a projected-space method are the projector's outputs already.
            features.append(tokens if projects_first(self.method) else projector(tokens.to(device)))
            image_anchors.append(
                torch.cat([anchors[t] + j * self.tokens_per_tile for j, t in enumerate(own)])
            )
        return features, image_anchors
