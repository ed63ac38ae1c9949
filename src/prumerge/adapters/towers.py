"""The ViT vision towers of the LLaVA family (CLIP, DINOv2, SigLIP): where their patch tokens,
grid, keys and importance come from.

One forward pass of the tower gives everything: the selected layer's hidden states, and the
q/k projections of one encoder layer, recorded by scoped forward hooks (so eager, sdpa and
flash attention all work). The importance is the [CLS] query's attention over the patches, or,
for towers without [CLS] (or with ``importance="mean"``), the mean attention each patch
receives from all queries of that layer.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prumerge.adapters.tome_tower import ToMeTower, unsupported_reason
from prumerge.errors import PrumergeError
from prumerge.methods import Method, VisionInputs, VisionMethod
from prumerge.ops import Reduction, cls_attention, full_reduction, mean_attention

# Vision towers with a [CLS] token first (then registers, if any), and those without one.
CLS_TOWERS = {
    "CLIPVisionModel": "CLIP",
    "Dinov2Model": "DINOv2",
    "Dinov2WithRegistersModel": "DINOv2 with registers",
}
NO_CLS_TOWERS = {"SiglipVisionModel": "SigLIP"}
_LAYER_LISTS = ("encoder.layers", "encoder.layer")
_QUERY_NAMES = ("q_proj", "query")
_KEY_NAMES = ("k_proj", "key")


def tower_names(towers: dict[str, str]) -> str:
    return ", ".join(f"{label} ({cls})" for cls, label in towers.items())


@contextlib.contextmanager
def capture(modules: dict[str, nn.Module | None]) -> Iterator[dict[str, Any]]:
    """Record the outputs of the given modules during the block; hooks are always removed."""
    captured: dict[str, Any] = {}
    handles = []
    for name, module in modules.items():
        if module is None:
            continue

        def hook(_module: nn.Module, _inputs: Any, output: Any, name: str = name) -> None:
            captured[name] = output

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def resolve_importance(method: Method, has_cls: bool, tower_label: str) -> str | None:
    """``"cls"``, ``"mean"`` or None (the method needs no attention) for this tower."""
    if not method.needs_attention:
        return None
    wanted = getattr(method, "importance", "auto")
    if wanted == "auto":
        return "cls" if has_cls else "mean"
    if wanted == "cls" and not has_cls:
        raise PrumergeError(
            f"importance='cls' needs a [CLS] token and {tower_label} has none; supported here: "
            f"importance='mean' (the default for this tower)"
        )
    return wanted


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: accelerate's execution device if it dispatched the
    module (its weights may sit on the meta device, offloaded), else its parameters' device."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def refuse_tower_merge(method: Method, reason: str) -> None:
    """Raise a one-line error if ``method`` must merge inside the tower (``where="tower"``)
    where this family cannot; methods with ``where="auto"`` reduce after the tower there."""
    if getattr(method, "where", "after") == "tower":
        raise PrumergeError(
            f"{method.name} cannot merge inside the vision tower here: {reason}; use "
            f"where='after' (or 'auto', which merges after the tower where it cannot inside)"
        )


@dataclass
class TowerOutput:
    """One batch of views through a ViT tower.

    Attributes:
        inputs: the method's inputs: patch features (V, N, C), keys and importance.
        passthrough: (V, R, C) tokens the model keeps that are no grid patches (DINOv2's
            registers), sent to the LLM unreduced before the patches; R may be 0.
        reduction: the reduction already made inside the tower (ToMe), whose tokens are
            ``inputs.features``; None when the method reduces after the tower.
    """

    inputs: VisionInputs
    passthrough: torch.Tensor
    reduction: Reduction | None = None


#: The transformers class of each tower ``model_type``: for callers that hold a config and
#: run their own tower module (the serving engine), so that they get the same layout.
TOWER_CLASSES = {
    "clip_vision_model": "CLIPVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "siglip_vision_model": "SiglipVisionModel",
}


@dataclass(frozen=True)
class TowerLayout:
    """Where a LLaVA-family tower's patch tokens and attention come from, for one method.

    Attributes:
        label: the tower's name in messages ("CLIP").
        has_cls: whether the tower prepends a [CLS] token.
        feature_layer: index into the hidden states (0 = the embeddings) of the features the
            projector reads.
        attention_layer: encoder layer whose q/k give the keys and importance, or None when
            the method reads no attention.
        importance: ``"cls"``, ``"mean"`` or None (no attention read).
        num_prefix_tokens: leading non-patch tokens of the hidden states ([CLS], registers).
        num_passthrough: of those, the tokens sent to the LLM unreduced (DINOv2's registers).
        num_heads: attention heads of the tower.
        patch_size: pixels per patch side.
        object_layer: encoder layer (0-based) of the method's second attention signal
            (``VisionMethod.object_layer``, 1-based), or None.
    """

    label: str
    has_cls: bool
    feature_layer: int
    attention_layer: int | None
    importance: str | None
    num_prefix_tokens: int
    num_passthrough: int
    num_heads: int
    patch_size: int
    object_layer: int | None = None


def tower_layout(config: Any, method: Method, tower_class: str) -> TowerLayout:
    """Derive the layer indices and token counts of a LLaVA config for ``method``.

    Args:
        config: the model's config (``vision_config``, ``vision_feature_layer``,
            ``vision_feature_select_strategy``).
        method: the reduction method.
        tower_class: the tower's transformers class name (``TOWER_CLASSES`` maps a config's
            ``model_type`` to it).

    Raises:
        PrumergeError: for an unsupported tower, feature layer or select strategy, or a
            method whose attention this tower cannot give.
    """
    has_cls = tower_class in CLS_TOWERS
    if not has_cls and tower_class not in NO_CLS_TOWERS:
        raise PrumergeError(
            f"vision tower {tower_class} is not supported; supported: "
            f"{tower_names(CLS_TOWERS)}, {tower_names(NO_CLS_TOWERS)}"
        )
    label = CLS_TOWERS.get(tower_class) or NO_CLS_TOWERS[tower_class]
    vision = config.vision_config
    strategy = config.vision_feature_select_strategy
    if has_cls and strategy != "default":
        raise PrumergeError(
            f"vision_feature_select_strategy={strategy!r} is not handled with a [CLS] tower; "
            f"supported: 'default' (patch tokens without [CLS])"
        )
    if not has_cls and strategy != "full":
        raise PrumergeError(
            f"vision_feature_select_strategy={strategy!r} drops the first token, but {label} "
            f"has no [CLS] token; supported: 'full'"
        )
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise PrumergeError(
            f"vision_feature_layer={layer!r} is not handled; supported: a single int layer"
        )
    num_layers = vision.num_hidden_layers
    if not -(num_layers + 1) <= layer <= num_layers:
        raise PrumergeError(
            f"vision_feature_layer={layer} is out of range for a {num_layers}-layer tower"
        )
    # hidden_states has num_layers + 1 entries: the embeddings, then each layer's output.
    feature_layer = layer % (num_layers + 1)
    registers = getattr(vision, "num_register_tokens", 0) or 0
    importance = resolve_importance(method, has_cls, label)
    attention_layer = None
    if importance is not None:
        # PruMerge reads the layer that consumes the selected features (the released code's
        # layer 23 of 24 for vision_feature_layer=-2); VisionZip the layer that produces them.
        source = getattr(method, "attention_source", "consumer")
        if source == "consumer" and feature_layer >= num_layers:
            if importance == "cls":
                raise PrumergeError(
                    f"vision_feature_layer={layer} is the tower's last output: no encoder layer "
                    f"consumes it, so there is no [CLS] attention to use; supported: "
                    f"-{num_layers + 1} to -2 (LLaVA-1.5 uses -2), or importance='mean'"
                )
            source = "producer"  # the mean attention of the layer that made the features
        attention_layer = feature_layer if source == "consumer" else feature_layer - 1
        if attention_layer < 0:
            raise PrumergeError(
                f"vision_feature_layer={layer} selects the embeddings: no encoder layer "
                f"produces them, so {method.name} has no attention to use"
            )
    object_layer = getattr(method, "object_layer", None)
    if object_layer is not None and not 1 <= object_layer <= num_layers:
        raise PrumergeError(
            f"{method.name}: object_layer={object_layer} is out of range for a "
            f"{num_layers}-layer {label} tower; supported: 1 to {num_layers}"
        )
    return TowerLayout(
        label=label,
        has_cls=has_cls,
        feature_layer=feature_layer,
        attention_layer=attention_layer,
        importance=importance,
        # Hidden states hold [CLS], registers, patches (CLS towers) or patches only (SigLIP);
        # the model keeps everything after [CLS], so registers reach the LLM as they are.
        num_prefix_tokens=(1 + registers) if has_cls else 0,
        num_passthrough=registers,
        num_heads=vision.num_attention_heads,
        patch_size=vision.patch_size,
        object_layer=None if object_layer is None else object_layer - 1,
    )


def tower_inputs(
    layout: TowerLayout,
    method: Method,
    hidden: torch.Tensor,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    grid: tuple[int, int],
    object_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TowerOutput:
    """The method's inputs from what the tower computed, however it was run.

    Args:
        layout: from ``tower_layout``.
        method: the reduction method.
        hidden: (V, P + N, C) hidden states of ``layout.feature_layer``, prefix tokens first.
        q: (V, P + N, C) query projections of ``layout.attention_layer`` (None without one).
        k: (V, P + N, C) key projections of the same layer.
        grid: (rows, cols) of the patch grid.
        object_qk: (q, k) of ``layout.object_layer``, each (V, P + N, C), when it is set.
    """
    prefix = layout.num_prefix_tokens
    features = hidden[:, prefix:]
    passthrough = hidden[:, prefix - layout.num_passthrough : prefix]
    rows, cols = grid
    inputs = VisionInputs(
        features=features,
        grid=grid if rows * cols == features.shape[1] else None,
        cls_token=hidden[:, 0] if layout.has_cls else None,
    )
    if layout.importance is not None:
        if q is None or k is None:
            raise PrumergeError(f"{method.name} needs the q/k of the attention layer")
        inputs.keys = k[:, prefix:]
        inputs.key_heads = layout.num_heads
        if layout.importance == "cls":
            inputs.cls_attn = cls_attention(
                q,
                k,
                num_heads=layout.num_heads,
                num_prefix_tokens=prefix,
                mode=getattr(method, "attention_mode", "multihead"),
            )
        else:
            inputs.cls_attn = mean_attention(
                q, k, num_heads=layout.num_heads, num_prefix_tokens=prefix
            )
    if layout.object_layer is not None:
        if object_qk is None:
            raise PrumergeError(
                f"{method.name} needs the q/k of tower layer {layout.object_layer + 1} as well"
            )
        inputs.object_importance = mean_attention(
            *object_qk, num_heads=layout.num_heads, num_prefix_tokens=prefix
        )
    return TowerOutput(inputs=inputs, passthrough=passthrough)


class ViTTower:
    """How to read patch tokens, keys and importance off one LLaVA-family vision tower.

    Args:
        tower: the vision tower module.
        config: the model's config.
        method: the reduction method.
        tower_merge_refused: why this family cannot use merging inside the tower (anyres
            views are laid out as whole grids), or None if it can where the tower allows.
    """

    def __init__(
        self,
        tower: nn.Module,
        config: Any,
        method: Method,
        *,
        tower_merge_refused: str | None = None,
    ) -> None:
        self.tower = tower
        self.layout = layout = tower_layout(config, method, type(tower).__name__)
        self.has_cls = layout.has_cls
        self.feature_layer = layout.feature_layer
        self.num_prefix_tokens = layout.num_prefix_tokens
        self.num_passthrough = layout.num_passthrough
        self.num_heads = layout.num_heads
        self.patch_size = layout.patch_size
        self.image_size = config.vision_config.image_size
        self.label = layout.label
        self.importance = layout.importance
        self.resizes = isinstance(method, VisionMethod) and method.resizes_input
        if self.resizes and self.num_passthrough:
            raise PrumergeError(f"{method.name} does not support towers with register tokens")
        self.interpolates = (
            "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters
        )
        self.method = method
        self.query = self.key = None
        self.object_query = self.object_key = None
        # Methods that merge inside the tower (ToMe): the layers to patch, and the plan per
        # patch count (the images' grid decides it, not the config's image_size).
        self.merge_layers: nn.ModuleList | None = None
        self._merge_plans: dict[int, ToMeTower | None] = {}
        if isinstance(method, VisionMethod) and method.where != "after":
            self._check_tower_merge(tower_merge_refused)
        if self.merge_layers is not None:
            self.importance = None  # nothing to capture: the tower merges by its own keys
        elif layout.attention_layer is not None:
            self._find_attention(layout.attention_layer)
        if self.merge_layers is None and layout.object_layer is not None:
            self.object_query, self.object_key = self._qk(layout.object_layer)

    def _encoder_layers(self) -> nn.ModuleList:
        modules = dict(self.tower.named_modules())
        layers = next((modules[n] for n in modules if n.endswith(_LAYER_LISTS)), None)
        if not isinstance(layers, nn.ModuleList):
            raise PrumergeError(f"cannot find the encoder layers of {type(self.tower).__name__}")
        return layers

    def _check_tower_merge(self, refused: str | None) -> None:
        layers = self._encoder_layers()
        reason = refused or unsupported_reason(self.tower, layers, self.num_passthrough)
        if reason is not None:
            refuse_tower_merge(self.method, f"{reason} ({self.label} tower)")
            return
        self.merge_layers = layers

    def tome_tower(self, num_patches: int) -> ToMeTower | None:
        """The tower merging for images of ``num_patches`` patches, or None when the plan
        merges nothing (the budget keeps every patch); PrumergeError if it cannot be met."""
        if num_patches not in self._merge_plans:
            method = self.method
            assert isinstance(method, VisionMethod) and self.merge_layers is not None
            try:
                plan = method.tower_merge(
                    num_patches=num_patches,
                    num_prefix_tokens=self.num_prefix_tokens,
                    num_layers=self.feature_layer,
                )
            except ValueError as exc:
                raise PrumergeError(
                    f"{method.name}: {exc} (the {self.label} tower's layers before its selected "
                    f"features); use a larger keep or where='after'"
                ) from None
            merging = plan is not None and sum(plan.schedule) > 0
            self._merge_plans[num_patches] = (
                ToMeTower(self.merge_layers, plan, self.num_heads) if merging else None  # type: ignore[arg-type]
            )
        return self._merge_plans[num_patches]

    def _qk(self, layer: int) -> tuple[nn.Module, nn.Module]:
        parts = dict(self._encoder_layers()[layer].named_modules())
        query = next((m for n, m in parts.items() if n.endswith(_QUERY_NAMES)), None)
        key = next((m for n, m in parts.items() if n.endswith(_KEY_NAMES)), None)
        if query is None or key is None:
            raise PrumergeError(
                f"cannot find the q/k projections in layer {layer} of {type(self.tower).__name__}"
            )
        return query, key

    def _find_attention(self, attention_layer: int) -> None:
        self.query, self.key = self._qk(attention_layer)
        self.attention_layer = attention_layer

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        return pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size

    def run(self, pixel_values: torch.Tensor) -> TowerOutput:
        """Run the tower on (V, 3, H, W) views; resized first for ``resizes_input`` methods."""
        tower = self.tower
        dtype = next(tower.parameters()).dtype
        pixel_values = pixel_values.to(device=execution_device(tower), dtype=dtype)
        rows, cols = self.grid(pixel_values)
        extra: dict[str, Any] = {}
        if self.resizes:
            rows, cols = self.method.target_grid(rows, cols)  # type: ignore[attr-defined]
            size = (rows * self.patch_size, cols * self.patch_size)
            if size != tuple(pixel_values.shape[-2:]):
                pixel_values = F.interpolate(
                    pixel_values.float(), size=size, mode="bilinear", antialias=True
                ).to(dtype)
            if self.interpolates:
                extra["interpolate_pos_encoding"] = True
        if self.merge_layers is not None:
            return self._run_merging(pixel_values, rows, cols)
        hooks = {"q": self.query, "k": self.key, "oq": self.object_query, "ok": self.object_key}
        with capture(hooks) as captured:
            outputs = tower(pixel_values, output_hidden_states=True, return_dict=True, **extra)
        hidden = outputs.hidden_states[self.feature_layer]  # (V, P + N, C)
        object_qk = (captured["oq"], captured["ok"]) if "oq" in captured else None
        return tower_inputs(
            self.layout,
            self.method,
            hidden,
            captured.get("q"),
            captured.get("k"),
            (rows, cols),
            object_qk=object_qk,
        )

    def _run_merging(self, pixel_values: torch.Tensor, rows: int, cols: int) -> TowerOutput:
        """The tower with the method merging inside it (ToMe): the merged tokens and their
        ``Reduction`` of the rows x cols patches."""
        merging = self.tome_tower(rows * cols)
        prefix = self.num_prefix_tokens
        with contextlib.ExitStack() as stack:
            state = stack.enter_context(merging.merging()) if merging is not None else {}
            outputs = self.tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states[self.feature_layer]  # (V, P + K, C)
        if merging is None:  # nothing to merge: every patch, unchanged
            reduction = full_reduction(hidden[:, prefix:])
        else:
            reduction = state["merger"].reduction(hidden, prefix=prefix, order=merging.plan.order)
        cls_token = hidden[:, 0] if self.has_cls else None
        inputs = VisionInputs(features=reduction.tokens, grid=None, cls_token=cls_token)
        return TowerOutput(inputs=inputs, passthrough=hidden[:, prefix:prefix], reduction=reduction)
