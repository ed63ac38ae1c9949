"""Tiny random configurations of every supported family: the one table.

``scripts/tiny_checkpoints.py`` saves models of these configurations (2 layers) with working
processors, for users and the command tests; the adapter tests (``tests/adapters/families.py``)
build them in memory (3 layers). Each entry is ``config(layers)``: a transformers config with
a text model and a vision tower of ``layers`` layers each, hidden size 32, and a vocabulary
of ``VOCAB`` ids whose special tokens sit at the ids named below. Building a model of one
costs a few hundred thousand parameters and no download.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CONFIGS", "IMAGE_ID", "PATCH", "PINPOINTS", "QWEN_IDS", "VIEW", "VOCAB", "peaked"]

VOCAB = 100
PAD, BOS, EOS = 0, 1, 2
IMAGE_ID = 99
#: The other special ids (Qwen's video and vision start/end, Gemma's image begin/end, ...).
VIDEO_ID, START_ID, END_ID = 98, 97, 96
PATCH = 7  # CLIP, SigLIP and InternViT patch size
LLAVA_IMAGE = 42  # 6x6 patches
VIEW = 28  # anyres view: 4x4 patches
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
TILE = 56  # InternVL tiles and Gemma 3 images: 8x8 patches, 4x4 tokens after the projector
TILE_TOKENS = 16
#: The special ids of a Qwen-VL config.
QWEN_IDS = {
    "image_token_id": IMAGE_ID,
    "video_token_id": VIDEO_ID,
    "vision_start_token_id": START_ID,
    "vision_end_token_id": END_ID,
}


def vision(layers: int) -> dict[str, Any]:
    """A ViT tower's config fields (CLIP, SigLIP, InternViT)."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
    }


def text(layers: int) -> dict[str, Any]:
    """The language model's config fields: the tower's sizes, grouped-query attention."""
    return {
        **vision(layers),
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }


def llava(layers: int) -> Any:
    """LLaVA-1.5: CLIP 42 px (6x6 patches), Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision(layers), image_size=LLAVA_IMAGE, patch_size=PATCH),
        text_config=LlamaConfig(**text(layers)),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_next(layers: int) -> Any:
    """LLaVA-NeXT: CLIP 28 px views, anyres grids of up to 2x2 views, Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vision(layers), image_size=VIEW, patch_size=PATCH),
        text_config=LlamaConfig(**text(layers)),
        image_grid_pinpoints=PINPOINTS,
        image_token_id=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_onevision(layers: int) -> Any:
    """LLaVA-OneVision: SigLIP 28 px views, Qwen2; grids above 2 views' area are shrunk
    (bilinear), as ``anyres_max_9`` does for big images."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision(layers), image_size=VIEW, patch_size=PATCH),
        text_config=Qwen2Config(**text(layers)),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        vision_aspect_ratio="anyres_max_2",
    )


def _qwen(cls: type, vision_config: dict[str, Any], layers: int) -> Any:
    """A Qwen-VL config: M-RoPE text model, 4 px ViT patches merged 2x2."""
    text_config = dict(
        text(layers),
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
    )
    vision_config = {
        "depth": layers,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **vision_config,
    }
    return cls(vision_config=vision_config, text_config=text_config, **QWEN_IDS)


def qwen2_vl(layers: int) -> Any:
    """Qwen2-VL: a full-attention ViT (4 px patches, 2x2 merger), M-RoPE."""
    from transformers import Qwen2VLConfig

    return _qwen(Qwen2VLConfig, {"embed_dim": 32, "mlp_ratio": 2}, layers)


def qwen2_5_vl(layers: int) -> Any:
    """Qwen2.5-VL: window attention (2x2 merged tokens per window, so the blocks see window
    order) with block 1 attending fully."""
    from transformers import Qwen2_5_VLConfig

    extra = {
        "intermediate_size": 64,
        "window_size": 16,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [1],
    }
    return _qwen(Qwen2_5_VLConfig, extra, layers)


def qwen3_vl(layers: int) -> Any:
    """Qwen3-VL: a learned 4x4 position grid interpolated to each image, DeepStack features
    added after LLM layers 0 and 1, interleaved M-RoPE."""
    from transformers import Qwen3VLConfig

    extra = {
        "intermediate_size": 64,
        "out_hidden_size": 32,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
    }
    config = _qwen(Qwen3VLConfig, extra, layers)
    config.text_config.head_dim = 8
    config.text_config.rope_parameters["mrope_interleaved"] = True
    return config


def internvl(layers: int, qk_norm: bool = False) -> Any:
    """InternVL3: InternViT tiles of 56 px (8x8 patches, pixel-shuffled to 4x4 tokens),
    Qwen2; ``qk_norm`` norms q and k before attention, as InternViT-6B does."""
    from transformers import InternVLConfig

    tower = {**vision(layers), "image_size": TILE, "patch_size": PATCH}
    if qk_norm:
        tower.update(use_qk_norm=True, norm_type="rms_norm")
    return InternVLConfig(
        vision_config=tower,
        text_config=dict(text(layers), model_type="qwen2"),
        image_token_id=IMAGE_ID,
        image_seq_length=TILE_TOKENS,
    )


def gemma3(layers: int) -> Any:
    """Gemma 3: SigLIP 56 px (8x8 patches) average-pooled to 4x4 tokens; sliding-window
    layers (shorter than the prompts, so they see a window) alternate with full ones."""
    from transformers import Gemma3Config

    kinds = ["sliding_attention", "full_attention"]
    return Gemma3Config(
        vision_config={
            **vision(layers),
            "image_size": TILE,
            "patch_size": PATCH,
            "vision_use_head": False,
        },
        text_config=dict(
            text(layers),
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=12,
            layer_types=[kinds[i % 2] for i in range(layers)],
        ),
        mm_tokens_per_image=TILE_TOKENS,
        image_token_index=IMAGE_ID,
        boi_token_index=START_ID,
        eoi_token_index=END_ID,
    )


#: ``config(layers)`` per family, by the names ``prumerge.adapters.FAMILIES`` uses.
CONFIGS: dict[str, Callable[[int], Any]] = {
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen2_vl": qwen2_vl,
    "qwen3_vl": qwen3_vl,
    "internvl": internvl,
    "gemma3": gemma3,
}


def peaked(model: torch.nn.Module, scale: float = 6.0) -> torch.nn.Module:
    """Scale the vision towers' queries up: random weights give almost flat attention, and
    trained towers' attention is peaked (which the reduction methods rely on)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if "language_model" in name:
                continue
            if hasattr(module, "q_proj") and isinstance(module.q_proj, torch.nn.Linear):
                module.q_proj.weight.mul_(scale)
            if hasattr(module, "qkv") and isinstance(module.qkv, torch.nn.Linear):
                module.qkv.weight[: module.qkv.weight.shape[0] // 3].mul_(scale)
    return model
