"""The vision towers of the served LLaVA models, and how each yields features and q/k.

- CLIP: vLLM's own ``CLIPVisionModel``, built up to the deepest layer the method reads. Its
  q/k projections are fused (``qkv_proj``), so the encoder runs layer by layer here and the
  attention layer's q and k are split off its fused projection.
- SigLIP (no [CLS] token): vLLM's ``SiglipVisionModel``, run layer by layer in the same way
  for the mean attention the adapters read there.
- DINOv2 (the embedded default model; vLLM has no DINOv2): the transformers module itself,
  with scoped forward hooks on the q/k projections, exactly as the Hugging Face adapter runs it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.utils import WeightsMapper

from prumerge.errors import PrumergeError
from prumerge.serve.vision import TowerLayout, layers_needed

# Checkpoints saved by transformers 5 keep DINOv2's original parameter names; its modules
# use these (transformers renames them the same way when it loads such a checkpoint).
DINOV2_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}
# transformers 5 saves CLIP and SigLIP towers without the `vision_model.` level that older
# checkpoints (llava-hf's) and vLLM's modules have.
_MISSING_VISION_MODEL = re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)")


def tower_weights_mapper(kind: str) -> WeightsMapper:
    """Checkpoint names of the tower -> this tower's module names (before the model's prefixes)."""
    if kind == "dinov2":
        return WeightsMapper(orig_to_new_substr=DINOV2_RENAMES)
    return WeightsMapper(orig_to_new_regex={_MISSING_VISION_MODEL: r"\1vision_model."})


def tower_kind(vision_config: Any) -> str:
    """``"clip"``, ``"siglip"`` or ``"dinov2"``; a clear error for any other tower."""
    kind = vision_config.model_type
    if kind == "clip_vision_model":
        return "clip"
    if kind == "siglip_vision_model":
        return "siglip"
    if kind in ("dinov2", "dinov2_with_registers"):
        return "dinov2"
    raise PrumergeError(
        f"vision tower {kind!r} is not supported by the prumerge vLLM plugin; supported: "
        f"CLIP, SigLIP and DINOv2"
    )


def build_tower(config: Any, layout: TowerLayout, quant_config: Any, prefix: str) -> nn.Module:
    """The tower module, with the parameter names of the checkpoint (after the model's mapper)."""
    kind = tower_kind(config.vision_config)
    if kind == "dinov2":
        from transformers import AutoModel

        # Parameters come from the checkpoint through vLLM's loader, like every other weight.
        return AutoModel.from_config(config.vision_config)
    if kind == "clip":
        from vllm.model_executor.models.clip import CLIPVisionModel

        return CLIPVisionModel(
            config.vision_config,
            quant_config=quant_config,
            num_hidden_layers_override=layers_needed(layout),
            require_post_norm=False,
            prefix=prefix,
        )
    from vllm.model_executor.models.siglip import SiglipVisionModel

    return SiglipVisionModel(
        config.vision_config,
        quant_config=quant_config,
        num_hidden_layers_override=layers_needed(layout),
        require_post_norm=False,
        prefix=prefix,
    )


FeaturesAndQK = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def run_tower(
    tower: nn.Module, kind: str, layout: TowerLayout, pixel_values: torch.Tensor
) -> FeaturesAndQK:
    """Run the tower on a batch of images.

    Returns:
        ``(hidden, q, k)``: (B, P + N, C) hidden states of the feature layer, and the (B, P + N,
        C) query and key projections of ``layout.attention_layer`` (None if it is None).
    """
    if kind == "dinov2":
        return _run_transformers_tower(tower, layout, pixel_values)
    return _run_vllm_layers(tower.vision_model, kind, layout, pixel_values)


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the given modules during the block; hooks are always removed."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor, name: str = name) -> None:
            captured[name] = output

        handles.append(module.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _run_transformers_tower(
    tower: nn.Module, layout: TowerLayout, pixel_values: torch.Tensor
) -> FeaturesAndQK:
    modules = {}
    if layout.attention_layer is not None:
        attention = tower.encoder.layer[layout.attention_layer].attention
        modules = {"q": attention.q_proj, "k": attention.k_proj}
    with _capture(modules) as captured:
        outputs = tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = outputs.hidden_states[layout.feature_layer]
    return hidden, captured.get("q"), captured.get("k")


def _run_vllm_layers(
    vision: nn.Module, kind: str, layout: TowerLayout, pixel_values: torch.Tensor
) -> FeaturesAndQK:
    # vLLM's CLIP/SigLIP VisionTransformer.forward, unrolled so that the q/k of one layer can
    # be read. Built with layers_needed layers and no post-norm, as vLLM's own LLaVA builds it.
    hidden = vision.embeddings(pixel_values)
    if kind == "clip":
        hidden = vision.pre_layrnorm(hidden)  # hidden_states[0]
    q = k = None
    layers = vision.encoder.layers
    for index in range(layers_needed(layout)):
        layer = layers[index]
        if index == layout.attention_layer:
            q, k = _clip_query_key(layer, hidden)
        if index == layout.feature_layer:
            break  # only this layer's q/k were needed (PruMerge's consumer layer)
        out = layer(hidden)
        hidden = out[0] if isinstance(out, tuple) else out  # SigLIP's layers return a pair
    return hidden, q, k


def _clip_query_key(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-width q and k of a vLLM CLIP or SigLIP encoder layer for its input ``hidden``."""
    attention = layer.self_attn
    qkv, _ = attention.qkv_proj(layer.layer_norm1(hidden))
    q, k, _ = qkv.chunk(3, dim=-1)
    if attention.num_heads_per_partition != attention.num_heads:
        # Tensor parallel: this rank holds a slice of the heads; gather them all.
        from vllm.distributed import tensor_model_parallel_all_gather

        q = tensor_model_parallel_all_gather(q.contiguous())
        k = tensor_model_parallel_all_gather(k.contiguous())
    return q, k
