"""A CLIP text tower beside the model: the instruction and the patches in CLIP's joint
image-text space, for methods that weigh patches by CLIP relevance (``cdpruner`` with
``relevance="clip"``, as CDPruner's release does).

The checkpoint is a CLIP model directory (``CLIPModel``, e.g. the one LLaVA-1.5's tower comes
from): its tokenizer, its text tower with ``text_projection`` (``CLIPTextModelWithProjection``),
and, for the patches, its vision ``post_layernorm`` and ``visual_projection``. Only those
weights are read; the vision encoder itself is not loaded (the model's own tower made the
patch features).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prumerge.errors import PrumergeError

_TEXT_PREFIXES = ("text_model.", "text_projection.")
_VISION_KEYS = {
    "vision_model.post_layernorm.weight": "post_layernorm.weight",
    "vision_model.post_layernorm.bias": "post_layernorm.bias",
    "visual_projection.weight": "visual_projection.weight",
}


def _weights(directory: Path, wanted: Any) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint whose names ``wanted(name)`` accepts (safetensors, one
    file or sharded, or a PyTorch ``.bin``)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = []
    tensors: dict[str, torch.Tensor] = {}
    if files:
        from safetensors import safe_open

        for name in files:
            with safe_open(str(directory / name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if wanted(key):
                        tensors[key] = handle.get_tensor(key)
        return tensors
    binary = directory / "pytorch_model.bin"
    if not binary.exists():
        raise PrumergeError(f"text tower {directory}: no model.safetensors or pytorch_model.bin")
    state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
    return {key: value for key, value in state.items() if wanted(key)}


class ClipTextTower(nn.Module):
    """CLIP's text tower with projection, its tokenizer, and its vision side's last norm and
    projection (see the module docstring).

    Args:
        path: a CLIP checkpoint directory (``config.json`` of model type ``clip``, weights,
            tokenizer).

    Raises:
        PrumergeError: the directory is no CLIP checkpoint, or lacks a part.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

        directory = Path(path)
        try:
            config = AutoConfig.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise PrumergeError(f"text tower {directory}: not a model directory ({exc})") from None
        if getattr(config, "model_type", None) != "clip":
            raise PrumergeError(
                f"text tower {directory}: a CLIP checkpoint (CLIPModel) is needed, got model "
                f"type {getattr(config, 'model_type', None)!r}"
            )
        text_config = config.text_config
        # CLIPModel keeps the projection width at the top of its config.
        text_config.projection_dim = config.projection_dim
        vision = config.vision_config
        self.text = CLIPTextModelWithProjection(text_config)
        self.post_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        state = _weights(directory, lambda k: k.startswith(_TEXT_PREFIXES) or k in _VISION_KEYS)
        text_state = {k: v for k, v in state.items() if k.startswith(_TEXT_PREFIXES)}
        vision_state = {_VISION_KEYS[k]: v for k, v in state.items() if k in _VISION_KEYS}
        missing = set(_VISION_KEYS.values()) - set(vision_state)
        if missing:
            raise PrumergeError(f"text tower {directory}: no {', '.join(sorted(missing))}")
        result = self.text.load_state_dict(text_state, strict=False)
        # A checkpoint may leave out buffers (position ids); weights must all be there.
        absent = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if absent:
            raise PrumergeError(f"text tower {directory}: no {absent[0]} (and {len(absent)} more)")
        self.load_state_dict(vision_state, strict=False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise PrumergeError(f"text tower {directory}: no tokenizer ({exc})") from None
        self.context = int(text_config.max_position_embeddings)
        self.path = str(directory)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) CLIP text embeddings of every text, S the most 77-token rows of any,
        and the (B, S) bool mask of real rows.

        As the release: each text is tokenized whole (no truncation), zero-padded to a
        multiple of the text tower's context and cut into rows of that length, each row
        embedded on its own (``text_embeds``: pooled where CLIP's config pools, then
        projected). Rows after the first have no start token; only the last has the end
        token.
        """
        device = self.visual_projection.weight.device
        rows: list[torch.Tensor] = []
        for text in texts:
            encoded = self.tokenizer(text=text, return_tensors="pt")
            ids, mask = encoded["input_ids"], encoded["attention_mask"]  # (1, T)
            segments = (ids.shape[1] - 1) // self.context + 1
            pad = segments * self.context - ids.shape[1]
            ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1).view(segments, self.context)
            mask = torch.cat([mask, mask.new_zeros(1, pad)], dim=1).view(segments, self.context)
            out = self.text(input_ids=ids.to(device), attention_mask=mask.to(device))
            rows.append(out.text_embeds)  # (segments, D)
        longest = max((r.shape[0] for r in rows), default=0)
        width = self.visual_projection.out_features
        embeds = torch.zeros(len(rows), longest, width, device=device)
        real = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
        for index, row in enumerate(rows):
            embeds[index, : row.shape[0]] = row
            real[index, : row.shape[0]] = True
        return embeds, real

    @torch.no_grad()
    def embed_patches(self, tower_features: torch.Tensor) -> torch.Tensor:
        """(B, N, D) the patches in the joint space: ``visual_projection(post_layernorm(x))``
        of the tower's (B, N, C) patch features, in float32 (the release: the projection in
        float32 too)."""
        width = self.post_layernorm.normalized_shape[0]
        if tower_features.shape[-1] != width:
            raise PrumergeError(
                f"the CLIP text tower {self.path} reads patch features of width {width}, and "
                f"this model's tower gives {tower_features.shape[-1]}: its visual_projection "
                f"cannot place them (use the CLIP checkpoint the model's tower comes from)"
            )
        features = tower_features.to(self.visual_projection.weight.device, torch.float32)
        return self.visual_projection(self.post_layernorm(features))


@functools.lru_cache(maxsize=1)
def _load(path: str) -> ClipTextTower:
    # One tower per process: every configuration of an evaluation patches a new handle.
    return ClipTextTower(path)


def text_tower_for(method: Any, tokenizer: Any, device: torch.device) -> ClipTextTower | None:
    """The text tower ``method.text_tower`` names, on ``device``; None for methods that name
    none.

    Raises:
        PrumergeError: no tokenizer to decode the instructions with, or a bad checkpoint.
    """
    path = getattr(method, "text_tower", None)
    if not path:
        return None
    if not callable(getattr(tokenizer, "decode", None)):
        raise PrumergeError(
            f"{method.name} with text_tower reads each instruction as text: pass the model's "
            f"processor, prumerge.apply(model, method, processor=processor)"
        )
    return _load(str(Path(path).resolve())).to(device)
