"""A tiny random Qwen2.5-VL checkpoint that vLLM-CPU can serve (for the serving tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_served_qwen(directory: Path) -> Path:
    """The tiny Qwen2.5-VL of scripts/tiny_checkpoints.py with a language model vLLM-CPU's
    attention runs (head size 32; the script's is 8) and a wider merger to match."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
    )

    from prumerge.loading.checkpoint import save_images_only
    from prumerge.models import tiny
    from tests.scripts import load_script

    script = load_script("tiny_checkpoints")
    text = dict(
        tiny.text(2),
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "mrope_section": [8, 4, 4], "rope_theta": 1e4},
    )
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 16,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
    }
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **tiny.QWEN_IDS)
    model = tiny.peaked(Qwen2_5_VLForConditionalGeneration(config).eval())
    model.generation_config.pad_token_id = tiny.PAD
    model.generation_config.eos_token_id = tiny.EOS
    target = directory / "qwen2_5_vl-served"
    model.save_pretrained(str(target))
    save_images_only(script._qwen_processor(Qwen2_5_VLProcessor), target)
    return target
