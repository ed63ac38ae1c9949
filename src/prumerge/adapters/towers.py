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

from prumerge.errors import PrumergeError
from prumerge.methods import Method, VisionInputs, VisionMethod
from prumerge.ops import cls_attention, mean_attention

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


@dataclass
class TowerOutput:
    """One batch of views through a ViT tower.

    Attributes:
        inputs: the method's inputs: patch features (V, N, C), keys and importance.
        passthrough: (V, R, C) tokens the model keeps that are no grid patches (DINOv2's
            registers), sent to the LLM unreduced before the patches; R may be 0.
    """

    inputs: VisionInputs
    passthrough: torch.Tensor


class ViTTower:
    """How to read patch tokens, keys and importance off one LLaVA-family vision tower."""

    def __init__(self, tower: nn.Module, config: Any, method: Method) -> None:
        self.tower = tower
        name = type(tower).__name__
        self.has_cls = name in CLS_TOWERS
        if not self.has_cls and name not in NO_CLS_TOWERS:
            raise PrumergeError(
                f"vision tower {name} is not supported; supported: "
                f"{tower_names(CLS_TOWERS)}, {tower_names(NO_CLS_TOWERS)}"
            )
        label = CLS_TOWERS.get(name) or NO_CLS_TOWERS[name]
        vision = config.vision_config
        strategy = config.vision_feature_select_strategy
        if self.has_cls and strategy != "default":
            raise PrumergeError(
                f"vision_feature_select_strategy={strategy!r} is not handled with a [CLS] tower; "
                f"supported: 'default' (patch tokens without [CLS])"
            )
        if not self.has_cls and strategy != "full":
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
        self.feature_layer = layer % (num_layers + 1)
        registers = getattr(vision, "num_register_tokens", 0) or 0
        # Hidden states hold [CLS], registers, patches (CLS towers) or patches only (SigLIP);
        # the model keeps everything after [CLS], so registers reach the LLM as they are.
        self.num_prefix_tokens = (1 + registers) if self.has_cls else 0
        self.num_passthrough = registers
        self.num_heads = vision.num_attention_heads
        self.patch_size = vision.patch_size
        self.image_size = vision.image_size
        self.label = label
        self.importance = resolve_importance(method, self.has_cls, label)
        self.resizes = isinstance(method, VisionMethod) and method.resizes_input
        if self.resizes and self.num_passthrough:
            raise PrumergeError(f"{method.name} does not support towers with register tokens")
        self.interpolates = (
            "interpolate_pos_encoding" in inspect.signature(tower.forward).parameters
        )
        self.method = method
        self.query = self.key = None
        if self.importance is not None:
            self._find_attention(num_layers, layer, method)

    def _find_attention(self, num_layers: int, layer: int, method: Method) -> None:
        index = self.feature_layer
        # PruMerge reads the layer that consumes the selected features (the released code's
        # layer 23 of 24 for vision_feature_layer=-2); VisionZip the layer that produces them.
        source = getattr(method, "attention_source", "consumer")
        if source == "consumer" and index >= num_layers:
            if self.importance == "cls":
                raise PrumergeError(
                    f"vision_feature_layer={layer} is the tower's last output: no encoder layer "
                    f"consumes it, so there is no [CLS] attention to use; supported: "
                    f"-{num_layers + 1} to -2 (LLaVA-1.5 uses -2), or importance='mean'"
                )
            source = "producer"  # the mean attention of the layer that made the features
        attention_layer = index if source == "consumer" else index - 1
        if attention_layer < 0:
            raise PrumergeError(
                f"vision_feature_layer={layer} selects the embeddings: no encoder layer "
                f"produces them, so {method.name} has no attention to use"
            )
        modules = dict(self.tower.named_modules())
        layers = next((modules[n] for n in modules if n.endswith(_LAYER_LISTS)), None)
        if not isinstance(layers, nn.ModuleList):
            raise PrumergeError(f"cannot find the encoder layers of {type(self.tower).__name__}")
        parts = dict(layers[attention_layer].named_modules())
        self.query = next((m for n, m in parts.items() if n.endswith(_QUERY_NAMES)), None)
        self.key = next((m for n, m in parts.items() if n.endswith(_KEY_NAMES)), None)
        if self.query is None or self.key is None:
            raise PrumergeError(
                f"cannot find the q/k projections in layer {attention_layer} of "
                f"{type(self.tower).__name__}"
            )
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
        with capture({"q": self.query, "k": self.key}) as captured:
            outputs = tower(pixel_values, output_hidden_states=True, return_dict=True, **extra)
        hidden = outputs.hidden_states[self.feature_layer]  # (V, P + N, C)
        prefix = self.num_prefix_tokens
        features = hidden[:, prefix:]
        passthrough = hidden[:, prefix - self.num_passthrough : prefix]
        grid = (rows, cols) if rows * cols == features.shape[1] else None
        inputs = VisionInputs(features=features, grid=grid)
        if self.importance is not None:
            q, k = captured["q"], captured["k"]
            inputs.keys = k[:, prefix:]
            if self.importance == "cls":
                inputs.cls_attn = cls_attention(
                    q,
                    k,
                    num_heads=self.num_heads,
                    num_prefix_tokens=prefix,
                    mode=getattr(self.method, "attention_mode", "multihead"),  # type: ignore[arg-type]
                )
            else:
                inputs.cls_attn = mean_attention(
                    q, k, num_heads=self.num_heads, num_prefix_tokens=prefix
                )
        return TowerOutput(inputs=inputs, passthrough=passthrough)
