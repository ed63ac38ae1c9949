"""A tiny random CLIP checkpoint (``CLIPModel`` + a real ``CLIPTokenizer``) saved like the
openai ones, for ``cdpruner``'s ``relevance="clip"``: its vision encoder can be a tiny
model's own tower, as LLaVA's tower is a CLIP's. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

PROJECTION = 24


def save_tiny_clip(directory: Path, tower: Any) -> Path:
    """Write a CLIP checkpoint whose vision encoder is ``tower`` (a ``CLIPVisionModel``).

    The tokenizer is CLIP's over a byte-level alphabet without merges (one token per
    character, so a text of more than 75 characters takes two rows of 77), its end token the
    largest id, as in CLIP, whose legacy config pools at argmax(ids).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<|startoftext|>", *alphabet, *(c + "</w>" for c in alphabet), "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[])
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,  # CLIP's legacy value: pool at the largest id
        projection_dim=PROJECTION,  # CLIP checkpoints repeat it in both sub-configs
    )
    vision = {**tower.config.to_dict(), "projection_dim": PROJECTION}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)
    torch.manual_seed(1)
    clip = CLIPModel(config).eval()
    clip.vision_model.load_state_dict(tower.state_dict())
    directory.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
