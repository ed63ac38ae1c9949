"""Visual-token reduction on Hugging Face ``LlavaForConditionalGeneration`` models.

``apply`` patches one model instance (its ``forward`` and ``generate`` attributes, nothing at
class level) so that the usual processor -> generate code path runs with fewer visual tokens:

1. the vision tower runs once, with scoped forward hooks on the q/k projections of the
   encoder layer that consumes ``vision_feature_layer`` (so any attention implementation
   works: eager, sdpa or flash);
2. the method reduces each image's patch features before the projector;
3. each image's run of placeholder tokens is cut to its reduced length, the batch is
   re-padded (on the left for generation) and ``inputs_embeds`` are built with the reduced
   features scattered into the placeholders;
4. the original ``generate``/``forward`` runs on those embeddings.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prumerge.adapters.sequence import images_per_row, shrink_placeholders
from prumerge.errors import PrumergeError
from prumerge.methods import VisionInputs, VisionMethod
from prumerge.ops import Reduction, cls_attention

SUPPORTED_MODELS = ("LlavaForConditionalGeneration",)
# Vision towers with a [CLS] token first, and the module names of their q/k projections.
SUPPORTED_TOWERS = {
    "CLIPVisionModel": "CLIP",
    "Dinov2Model": "DINOv2",
    "Dinov2WithRegistersModel": "DINOv2 with registers",
}
_LAYER_LISTS = ("encoder.layers", "encoder.layer")
_QUERY_NAMES = ("q_proj", "query")
_KEY_NAMES = ("k_proj", "key")


@dataclass
class TokenStats:
    """Visual tokens per image of the last call, in the order of ``pixel_values``.

    Attributes:
        tokens_in: patch tokens each image produced.
        tokens_out: tokens each image sent to the LLM.
        vision_seconds: vision tower + reduction + projector time of the last call.
    """

    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    vision_seconds: float = 0.0
    #: LLM layers that saw all ``tokens_in`` before pruning (FastV's K; 0 for vision-side methods).
    llm_full_layers: int = 0

    @property
    def mean_in(self) -> float:
        return sum(self.tokens_in) / max(len(self.tokens_in), 1)

    @property
    def mean_out(self) -> float:
        return sum(self.tokens_out) / max(len(self.tokens_out), 1)


@dataclass
class _TowerLayout:
    feature_layer: int  # index into hidden_states (0 = embeddings)
    num_prefix_tokens: int
    num_heads: int
    patch_size: int
    query: nn.Module | None
    key: nn.Module | None


def _tower_layout(model: nn.Module, method: VisionMethod) -> _TowerLayout:
    config = model.config
    tower = model.model.vision_tower
    tower_name = type(tower).__name__
    if tower_name not in SUPPORTED_TOWERS:
        raise PrumergeError(
            f"vision tower {tower_name} is not supported: prumerge needs a ViT with a [CLS] "
            f"token; supported: {', '.join(SUPPORTED_TOWERS.values())} "
            f"({', '.join(SUPPORTED_TOWERS)})"
        )
    strategy = config.vision_feature_select_strategy
    if strategy != "default":
        raise PrumergeError(
            f"vision_feature_select_strategy={strategy!r} is not handled; supported: 'default' "
            f"(patch tokens without [CLS])"
        )
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise PrumergeError(
            f"vision_feature_layer={layer!r} is not handled; supported: a single int layer"
        )
    vision = config.vision_config
    num_layers = vision.num_hidden_layers
    # hidden_states has num_layers + 1 entries: the embeddings, then each layer's output.
    index = layer % (num_layers + 1)
    if not -(num_layers + 1) <= layer <= num_layers:
        raise PrumergeError(
            f"vision_feature_layer={layer} is out of range for a {num_layers}-layer tower"
        )
    query = key = None
    if method.needs_attention:
        # PruMerge reads the layer that consumes the selected features (the released code's
        # layer 23 of 24 for vision_feature_layer=-2); VisionZip the layer that produces them.
        attention_layer = index if method.attention_source == "consumer" else index - 1
        if method.attention_source == "consumer" and index >= num_layers:
            raise PrumergeError(
                f"vision_feature_layer={layer} is the tower's last output: no encoder layer "
                f"consumes it, so there is no [CLS] attention to use; supported: "
                f"-{num_layers + 1} to -2 (LLaVA-1.5 uses -2)"
            )
        if attention_layer < 0:
            raise PrumergeError(
                f"vision_feature_layer={layer} selects the embeddings: no encoder layer "
                f"produces them, so {method.name} has no attention to use"
            )
        modules = dict(tower.named_modules())
        layers = next((modules[n] for n in modules if n.endswith(_LAYER_LISTS)), None)
        if not isinstance(layers, nn.ModuleList):
            raise PrumergeError(f"cannot find the encoder layers of {tower_name}")
        parts = dict(layers[attention_layer].named_modules())
        query = next((m for n, m in parts.items() if n.endswith(_QUERY_NAMES)), None)
        key = next((m for n, m in parts.items() if n.endswith(_KEY_NAMES)), None)
        if query is None or key is None:
            raise PrumergeError(
                f"cannot find the q/k projections in layer {attention_layer} of {tower_name}"
            )
    registers = getattr(vision, "num_register_tokens", 0) or 0
    return _TowerLayout(
        feature_layer=index,
        num_prefix_tokens=1 + registers,
        num_heads=vision.num_attention_heads,
        patch_size=vision.patch_size,
        query=query,
        key=key,
    )


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module | None]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the given modules during the block; hooks are always removed."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        if module is None:
            continue

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor, name: str = name) -> None:
            captured[name] = output

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class Handle:
    """A patched model. ``remove()`` (or leaving the ``with`` block) restores it exactly.

    Attributes:
        model: the patched model.
        method: the reduction method in use.
        stats: ``TokenStats`` of the last forward or generate call with images.
        last_reduction: the ``Reduction`` of the last call (per image, before the projector).
    """

    def __init__(self, model: nn.Module, method: VisionMethod) -> None:
        if type(model).__name__ not in SUPPORTED_MODELS:
            raise PrumergeError(
                f"{type(model).__name__} is not supported; supported models: "
                f"{', '.join(SUPPORTED_MODELS)} (LLaVA-1.5 family and LLaVA-architecture "
                f"models with a CLIP or DINOv2 tower)"
            )
        if getattr(model, "_prumerge_handle", None) is not None:
            raise PrumergeError("this model is already patched; call remove() on its handle first")
        self.model = model
        self.method = method
        self.layout = _tower_layout(model, method)
        self.stats = TokenStats()
        self.last_reduction: Reduction | None = None
        self.fastv = None
        if getattr(method, "inside_llm", False):
            from prumerge.adapters.fastv import FastVPatch

            self.fastv = FastVPatch(model.model.language_model, method.layer)  # type: ignore[attr-defined]
        self._original_forward = model.forward
        self._original_generate = model.generate
        # Plain functions that look like the originals to inspect.signature, which
        # generate() uses to validate its keyword arguments.
        model.forward = functools.wraps(self._original_forward)(
            lambda *a, **kw: self._forward(*a, **kw)
        )
        model.generate = functools.wraps(self._original_generate)(
            lambda *a, **kw: self._generate(*a, **kw)
        )
        model._prumerge_handle = self

    # -- lifecycle ---------------------------------------------------------------------
    def remove(self) -> None:
        """Undo the patch; the model's behaviour is then bit-identical to before."""
        model = self.model
        if getattr(model, "_prumerge_handle", None) is not self:
            return
        del model.forward
        del model.generate
        del model._prumerge_handle
        if self.fastv is not None:
            self.fastv.remove()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- vision ------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Reduced, projected features of each image: a list of (L_i, H) tensors."""
        start = time.perf_counter()
        model, layout = self.model, self.layout
        tower = model.model.vision_tower
        pixel_values = pixel_values.to(device=tower.device, dtype=tower.dtype)
        with _capture({"q": layout.query, "k": layout.key}) as captured:
            outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states[layout.feature_layer]  # (B, P + N, C)
        prefix = layout.num_prefix_tokens
        features = hidden[:, prefix:]
        rows, cols = (s // layout.patch_size for s in pixel_values.shape[-2:])
        if rows * cols != features.shape[1]:
            rows = cols = None  # a tower that resamples its grid; ops infer a square one
        inputs = VisionInputs(features=features, grid=(rows, cols) if rows else None)
        if self.method.needs_attention:
            q, k = captured["q"], captured["k"]
            inputs.keys = k[:, prefix:]
            inputs.cls_attn = cls_attention(
                q,
                k,
                num_heads=layout.num_heads,
                num_prefix_tokens=prefix,
                mode=self.method.attention_mode,  # type: ignore[arg-type]
            )
        reduction = self.method.reduce(inputs)
        projected = model.model.multi_modal_projector(reduction.tokens)  # (B, K, H)
        lengths = reduction.lengths.tolist()
        self.last_reduction = reduction
        self.stats = TokenStats(
            tokens_in=[features.shape[1]] * features.shape[0],
            tokens_out=lengths,
            vision_seconds=time.perf_counter() - start,
        )
        return [row[:n] for row, n in zip(projected, lengths, strict=True)]

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        left_pad: bool | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The language model's inputs with each image's tokens reduced.

        This is what the patched ``forward`` and ``generate`` run before the original model;
        training code that computes its own loss can call it directly, so that it trains on
        exactly the tokens served.

        Args:
            input_ids: (B, L) ids with N placeholders per image, as the processor makes them.
            pixel_values: (I, 3, H, W) the images, in placeholder order.
            attention_mask: (B, L) padding mask, or a (B, 1, L, L) mask (boolean or additive)
                for packed rows; None for no padding.
            labels: (B, L) or None; moved along with the ids.
            position_ids: (B, L) or None. Given, they are carried through the cut (see
                ``Packed.position_ids``); None lets the model count positions from the mask.
            left_pad: re-pad on the left; default: when the 2-D mask is padded on the left.
                Rows with a 4-D mask are never re-padded on the left.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` and ``position_ids`` (None where not
            given) over the shortened sequence, and ``inputs_embeds`` with the reduced
            features in the image positions. Gradients flow from ``inputs_embeds`` into the
            projector and into the input embeddings.
        """
        config = self.model.config
        image_token_id = config.image_token_id
        if pixel_values.ndim != 4:
            raise PrumergeError(
                f"pixel_values must be (images, channels, height, width); got "
                f"{tuple(pixel_values.shape)}"
            )
        mask_4d = attention_mask is not None and attention_mask.ndim == 4
        if left_pad is None:
            left_pad = (
                attention_mask is not None
                and not mask_4d
                and bool((attention_mask[:, 0] == 0).any())
            )
        num_patches = (pixel_values.shape[-2] // self.layout.patch_size) * (
            pixel_values.shape[-1] // self.layout.patch_size
        )
        per_row = images_per_row(input_ids, image_token_id, num_patches)
        if int(per_row.sum()) != pixel_values.shape[0]:
            raise PrumergeError(
                f"the prompts hold placeholders for {int(per_row.sum())} image(s) but "
                f"{pixel_values.shape[0]} image(s) were given"
            )
        features = self.encode_images(pixel_values)
        lengths = torch.tensor([f.shape[0] for f in features], device=input_ids.device)
        pad_id = _pad_token_id(self.model)
        packed = shrink_placeholders(
            input_ids,
            None if mask_4d else attention_mask,
            labels,
            image_token_id=image_token_id,
            tokens_per_image=num_patches,
            lengths=lengths,
            pad_token_id=pad_id,
            left_pad=bool(left_pad) and not mask_4d,
        )
        if self.fastv is not None:
            if mask_4d:
                raise PrumergeError("fastv needs a 2-D attention mask")
            kept = self.fastv.arm(
                packed.input_ids,
                packed.attention_mask,
                image_token_id,
                num_patches,
                self.method.keep,  # type: ignore[attr-defined]
            )
            self.stats.tokens_out = [kept] * len(features)
            self.stats.llm_full_layers = self.fastv.layer
        embed = self.model.get_input_embeddings()
        inputs_embeds = embed(packed.input_ids)
        image_positions = packed.input_ids == image_token_id
        if features:
            values = torch.cat(features).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(image_positions[..., None], values)
        return {
            "input_ids": packed.input_ids,
            "attention_mask": packed.attention_mask_4d(attention_mask)  # type: ignore[arg-type]
            if mask_4d
            else packed.attention_mask,
            "labels": packed.labels,
            "position_ids": None if position_ids is None else packed.position_ids(position_ids),
            "inputs_embeds": inputs_embeds,
        }

    def _disarm(self) -> None:
        if self.fastv is not None:
            self.fastv.disarm()

    # -- patched entry points ----------------------------------------------------------
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids")
        if pixel_values is None or input_ids is None:
            return self._original_forward(*args, **kwargs)
        if self.fastv is not None and kwargs.get("labels") is not None:
            raise PrumergeError("fastv does not support labels: it drops tokens mid-model")
        prepared = self.prepare_inputs(
            input_ids,
            pixel_values,
            kwargs.get("attention_mask"),
            kwargs.get("labels"),
            kwargs.get("position_ids"),
        )
        kwargs.pop("pixel_values")
        kwargs.pop("input_ids")
        kwargs.pop("position_ids", None)
        if prepared["position_ids"] is not None:  # given ones are carried; else the mask counts
            kwargs["position_ids"] = prepared["position_ids"]
        kwargs["attention_mask"] = prepared["attention_mask"]
        kwargs["inputs_embeds"] = prepared["inputs_embeds"]
        if kwargs.get("labels") is not None:
            kwargs["labels"] = prepared["labels"]
        try:
            return self._original_forward(*args, **kwargs)
        finally:
            self._disarm()

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["input_ids"] = args[0]
            args = args[1:]
        pixel_values = kwargs.get("pixel_values")
        input_ids = kwargs.get("input_ids")
        if pixel_values is None or input_ids is None or kwargs.get("inputs_embeds") is not None:
            self.stats = TokenStats()  # no images in this call
            return self._original_generate(*args, **kwargs)
        prepared = self.prepare_inputs(
            input_ids, pixel_values, kwargs.get("attention_mask"), left_pad=True
        )
        kwargs.pop("pixel_values")
        kwargs["input_ids"] = prepared["input_ids"]
        kwargs["attention_mask"] = prepared["attention_mask"]
        kwargs["inputs_embeds"] = prepared["inputs_embeds"]
        try:
            output = self._original_generate(*args, **kwargs)
        finally:
            self._disarm()
        # Give back the caller's own prompt followed by the new tokens, so that
        # out[:, inputs.input_ids.shape[1]:] is the answer exactly as without reduction.
        prompt_length = prepared["input_ids"].shape[1]  # type: ignore[union-attr]
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        restored = torch.cat([input_ids.to(sequences.device), sequences[:, prompt_length:]], dim=1)
        if isinstance(output, torch.Tensor):
            return restored
        output.sequences = restored
        return output


def _pad_token_id(model: nn.Module) -> int:
    for source in (model.generation_config, model.config.get_text_config()):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            return eos
        if isinstance(eos, list) and eos:
            return int(eos[0])
    return 0


def apply(model: nn.Module, method: str | VisionMethod = "prumerge", **options: Any) -> Handle:
    """Reduce the visual tokens of this one LLaVA model instance.

    Args:
        model: a ``LlavaForConditionalGeneration`` with a CLIP or DINOv2 vision tower.
        method: a registered method name (see ``prumerge.methods.method_names()``) or a
            ``VisionMethod`` instance.
        **options: the method's options, e.g. ``keep=0.25``, ``knn=32``, ``merge="mean"``.

    Returns:
        A ``Handle``: ``handle.stats`` has the tokens in/out per image of the last call, and
        ``handle.remove()`` (or a ``with`` block) undoes the patch.

    After ``apply``, ``model.generate(**processor(images=..., text=..., return_tensors="pt"))``
    works as usual and returns the caller's ``input_ids`` followed by the generated tokens,
    so ``processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])`` decodes the answers.
    ``model(**inputs, labels=labels)`` runs with the reduced tokens; its logits and loss are
    over the shrunk sequence (each image's placeholders cut to its reduced length).
    """
    from prumerge.methods import build_method

    if isinstance(method, str):
        try:
            method = build_method(method, **options)
        except ValueError as exc:
            raise PrumergeError(str(exc)) from None
    elif options:
        raise PrumergeError("pass options either to the method instance or to apply, not both")
    return Handle(model, method)
