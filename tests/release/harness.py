"""Inputs for the release tests: random tower tensors at the two op-level shapes, and a tiny
random CLIP-tower LLaVA with what its tower computes, taken the way the releases take it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import prumerge
from prumerge.adapters.handle import Handle
from prumerge.methods import Method, VisionInputs
from prumerge.ops import cls_attention

#: (N, C, heads) of the op-level tests: CLIP-L/14-336 as LLaVA-1.5 has it, and a
#: DINOv2-S/14-224 sized tower.
SHAPES = [(576, 1024, 16), (256, 384, 6)]
SHAPE_IDS = ["576x1024x16", "256x384x6"]
BATCHES = [1, 4]


@dataclass
class TowerTensors:
    """One batch through one encoder layer (made up): what the releases read off a tower.

    Attributes:
        hidden: (B, 1 + N, C) the selected hidden states, [CLS] first.
        q: (B, 1 + N, C) queries of the attention layer.
        k: (B, 1 + N, C) keys of the same layer.
        heads: attention heads.
    """

    hidden: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    heads: int

    @property
    def attentions(self) -> torch.Tensor:
        """(B, heads, 1 + N, 1 + N) the layer's softmax attention, as ``output_attentions``."""
        batch, length, width = self.q.shape
        d = width // self.heads
        q = self.q.view(batch, length, self.heads, d).transpose(1, 2)
        k = self.k.view(batch, length, self.heads, d).transpose(1, 2)
        return (q @ k.transpose(-1, -2) * d**-0.5).softmax(dim=-1)

    @property
    def key_states(self) -> torch.Tensor:
        """(B, heads, 1 + N, d) the keys per head."""
        batch, length, width = self.k.shape
        return self.k.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def inputs(self, method: Method) -> VisionInputs:
        """What prumerge's ViT tower hands ``method`` for these tensors."""
        num = self.hidden.shape[1] - 1
        side = int(num**0.5)
        return VisionInputs(
            features=self.hidden[:, 1:],
            keys=self.k[:, 1:],
            key_heads=self.heads,
            cls_attn=cls_attention(
                self.q,
                self.k,
                num_heads=self.heads,
                mode=getattr(method, "attention_mode", "multihead"),
            ),
            grid=(side, side) if side * side == num else None,
            cls_token=self.hidden[:, 0],
        )


def tower_tensors(batch: int, num: int, width: int, heads: int, seed: int = 0) -> TowerTensors:
    """Random tensors whose [CLS] attention is peaked, as a trained tower's is."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 1 + num, width, generator=gen)
    q = torch.randn(batch, 1 + num, width, generator=gen) * 1.5
    k = torch.randn(batch, 1 + num, width, generator=gen)
    return TowerTensors(hidden=hidden, q=q, k=k, heads=heads)


# -- the tiny model -----------------------------------------------------------------------

IMAGE_TOKEN = 99
TOWER = {"hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 4}
IMAGE_SIZE, PATCH = 56, 7  # 8 x 8 = 64 patches
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def release_llava(seed: int = 0, text_layers: int = 3) -> LlavaForConditionalGeneration:
    """A tiny random LLaVA-1.5 with a CLIP tower (eager attention, so that it can return its
    attention weights) and ``vision_feature_layer=-2``, its [CLS] attention peaked."""
    vision = CLIPVisionConfig(
        **TOWER, intermediate_size=96, image_size=IMAGE_SIZE, patch_size=PATCH
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


def images(batch: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.5])[:batch, None, None, None]
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * scale


@dataclass
class TowerRun:
    """What the unpatched tower computes, per layer."""

    hidden_states: tuple[torch.Tensor, ...]  # (B, 1 + N, C) each, embeddings first
    attentions: tuple[torch.Tensor, ...]  # (B, heads, 1 + N, 1 + N) each
    q: list[torch.Tensor]  # per layer, (B, 1 + N, C) q_proj outputs
    k: list[torch.Tensor]  # per layer, (B, 1 + N, C) k_proj outputs


def run_tower(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> TowerRun:
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    q: dict[int, torch.Tensor] = {}
    k: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(layers):
        hooks.append(
            layer.self_attn.q_proj.register_forward_hook(
                lambda _m, _i, out, i=index: q.__setitem__(i, out)
            )
        )
        hooks.append(
            layer.self_attn.k_proj.register_forward_hook(
                lambda _m, _i, out, i=index: k.__setitem__(i, out)
            )
        )
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True, output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    return TowerRun(
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        q=[q[i] for i in range(len(layers))],
        k=[k[i] for i in range(len(layers))],
    )


def projector_inputs(
    model: LlavaForConditionalGeneration, method: str, pixels: torch.Tensor, **options
) -> tuple[list[torch.Tensor], Handle]:
    """The tokens of every image that reach the projector with ``method`` applied."""
    seen: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0])
    )
    try:
        with torch.no_grad(), prumerge.apply(model, method, **options) as handle:
            handle.encode_images(pixels)
    finally:
        hook.remove()
    (tokens,) = seen
    lengths = handle.last_reduction.lengths.tolist()
    return [row[:n] for row, n in zip(tokens, lengths, strict=True)], handle


def llm_inputs(
    model: LlavaForConditionalGeneration, method: str, pixels: torch.Tensor, **options
) -> list[torch.Tensor]:
    """The (projected) tokens of every image that reach the LLM with ``method`` applied."""
    with torch.no_grad(), prumerge.apply(model, method, **options) as handle:
        return handle.encode_images(pixels)
