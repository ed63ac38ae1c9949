"""What a LLaVA-style request costs for a given number of visual tokens.

``analyze_prefill`` and ``analyze_decode`` are LLM-Viewer's ``ModelAnalyzer.analyze`` split by
stage; ``estimate`` puts them together for one request: the prompt is visual + text tokens,
then ``new_tokens`` decode steps, optionally with the vision encoder and projector in front.
"""

from __future__ import annotations

from dataclasses import dataclass

from prumerge.cost.hardware import Hardware
from prumerge.cost.layers import (
    Attention,
    Convention,
    check_attention,
    check_convention,
    decoder_decode_ops,
    decoder_prefill_ops,
    encoder_embed_ops,
    encoder_layer_ops,
    lm_head_op,
    projector_ops,
)
from prumerge.cost.roofline import Precision, StageResult, analyze_stage
from prumerge.cost.specs import DecoderSpec, EncoderSpec, ProjectorSpec
from prumerge.errors import PrumergeError


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PrumergeError(f"{name} must be a positive integer, got {value!r}")


def analyze_prefill(
    spec: DecoderSpec,
    hardware: Hardware,
    seq_len: int,
    batch: int = 1,
    precision: Precision | None = None,
    attention: Attention = "eager",
    convention: Convention = "llm-viewer",
) -> StageResult:
    """Roofline of the decoder prefill over ``seq_len`` tokens, lm_head included.

    Args:
        spec: Decoder shapes.
        hardware: Device.
        seq_len: Prompt length s (visual + text tokens).
        batch: Batch size b.
        precision: Bit widths (default W16A16KV16).
        attention: "eager", "flash" or "flash-llm-viewer".
        convention: "llm-viewer" (its current source) or "llm-viewer-2024-03" (the version
            the PruMerge paper's table matches).
    """
    _check_positive(seq_len=seq_len, batch=batch)
    p = precision or Precision()
    attention = check_attention(attention)
    convention = check_convention(convention)
    layer = decoder_prefill_ops(
        spec, batch, seq_len, p, attention, hardware.onchip_buffer, convention
    )
    extra = [lm_head_op(spec, batch, p, convention)]
    return analyze_stage("prefill", layer, spec.num_layers, hardware, p, extra)


def analyze_decode(
    spec: DecoderSpec,
    hardware: Hardware,
    kv_len: int,
    batch: int = 1,
    precision: Precision | None = None,
    attention: Attention = "eager",
    convention: Convention = "llm-viewer",
) -> StageResult:
    """Roofline of one decode step whose query attends to ``kv_len`` cached positions."""
    _check_positive(kv_len=kv_len, batch=batch)
    p = precision or Precision()
    attention = check_attention(attention)
    convention = check_convention(convention)
    layer = decoder_decode_ops(
        spec, batch, kv_len, p, attention, hardware.onchip_buffer, convention
    )
    extra = [lm_head_op(spec, batch, p, convention)]
    return analyze_stage("decode", layer, spec.num_layers, hardware, p, extra)


@dataclass(frozen=True)
class DecodeSummary:
    """Totals over the decode steps of a generation.

    LLM-Viewer's ``analyze_generate_task`` convention: ``steps`` decode steps whose KV
    lengths are prompt, prompt + 1, ..., prompt + steps - 1.

    Attributes:
        steps: Number of decode steps (new tokens).
        time: Total decode time (s).
        ops: Total ops.
        memory_access: Total bytes moved.
        store_kv: Bytes appended to the KV cache.
        first: The first step's result (KV length = prompt).
    """

    steps: int
    time: float
    ops: float
    memory_access: float
    store_kv: float
    first: StageResult | None

    @property
    def time_per_token(self) -> float:
        return self.time / self.steps if self.steps else 0.0

    def to_dict(self, per_op: bool = False) -> dict[str, object]:
        return {
            "steps": self.steps,
            "time": self.time,
            "time_per_token": self.time_per_token,
            "ops": self.ops,
            "memory_access": self.memory_access,
            "store_kv": self.store_kv,
            "first_step": self.first.to_dict(per_op) if self.first else None,
        }


def analyze_generation(
    spec: DecoderSpec,
    hardware: Hardware,
    prompt_len: int,
    new_tokens: int,
    batch: int = 1,
    precision: Precision | None = None,
    attention: Attention = "eager",
    convention: Convention = "llm-viewer",
) -> DecodeSummary:
    """Sum the decode steps that generate ``new_tokens`` after a ``prompt_len`` prefill."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
        raise PrumergeError(f"new_tokens must be a non-negative integer, got {new_tokens!r}")
    time = ops = memory = store_kv = 0.0
    first: StageResult | None = None
    for step in range(new_tokens):
        r = analyze_decode(
            spec, hardware, prompt_len + step, batch, precision, attention, convention
        )
        if first is None:
            first = r
        time += r.time
        ops += r.ops
        memory += r.memory_access
        store_kv += r.totals["store_kv"]
    return DecodeSummary(new_tokens, time, ops, memory, store_kv, first)


@dataclass(frozen=True)
class VisionResult:
    """The image side: encoder (fixed cost) and projector (on the visual tokens kept)."""

    encoder: StageResult
    projector: StageResult

    @property
    def time(self) -> float:
        return self.encoder.time + self.projector.time

    @property
    def ops(self) -> float:
        return self.encoder.ops + self.projector.ops

    @property
    def weights(self) -> float:
        """Weight bytes of the encoder and the projector."""
        return self.encoder.totals["load_weight"] + self.projector.totals["load_weight"]

    def to_dict(self, per_op: bool = False) -> dict[str, object]:
        return {
            "time": self.time,
            "ops": self.ops,
            "encoder": self.encoder.to_dict(per_op),
            "projector": self.projector.to_dict(per_op),
        }


def analyze_vision(
    encoder: EncoderSpec,
    projector: ProjectorSpec,
    hardware: Hardware,
    visual_tokens: int,
    batch: int = 1,
    precision: Precision | None = None,
    attention: Attention = "eager",
) -> VisionResult:
    """Roofline of the vision encoder over the full image and the projector over the kept
    ``visual_tokens`` (PruMerge reduces between the two). One image per sample."""
    _check_positive(visual_tokens=visual_tokens, batch=batch)
    p = precision or Precision()
    attention = check_attention(attention)
    enc = analyze_stage(
        "vision_encoder",
        encoder_layer_ops(encoder, batch, p, attention, hardware.onchip_buffer),
        encoder.num_layers,
        hardware,
        p,
        encoder_embed_ops(encoder, batch, p),
    )
    proj = analyze_stage(
        "projector", projector_ops(projector, batch, visual_tokens, p), 1, hardware, p
    )
    return VisionResult(enc, proj)


@dataclass(frozen=True)
class CostEstimate:
    """Everything ``prumerge cost`` reports for one visual-token count.

    Attributes:
        visual_tokens: Visual tokens in the prompt.
        text_tokens: Text tokens in the prompt.
        batch: Batch size.
        prefill: Decoder prefill over visual + text tokens (lm_head included).
        decode: The decode steps.
        vision: Encoder + projector, when asked for.
    """

    visual_tokens: int
    text_tokens: int
    batch: int
    prefill: StageResult
    decode: DecodeSummary
    vision: VisionResult | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def kv_cache_prefill(self) -> float:
        """KV-cache bytes after the prefill (LLM-Viewer's memory_consumption_kv_cache)."""
        return self.prefill.totals["store_kv"]

    @property
    def kv_cache_final(self) -> float:
        """KV-cache bytes after the last decode step."""
        return self.prefill.totals["store_kv"] + self.decode.store_kv

    @property
    def weights(self) -> float:
        """Weight bytes read once in prefill: the decoder's weight footprint."""
        return self.prefill.totals["load_weight"]

    @property
    def memory_needed(self) -> float:
        """A lower bound on device memory for this request: the decoder's weights (and the
        vision encoder's, if modelled) plus the KV cache after the last step."""
        vision = self.vision.weights if self.vision else 0.0
        return self.weights + vision + self.kv_cache_final

    @property
    def time_to_first_token(self) -> float:
        """Vision (if modelled) + decoder prefill time."""
        return self.prefill.time + (self.vision.time if self.vision else 0.0)

    def to_dict(self, per_op: bool = False) -> dict[str, object]:
        return {
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "prompt_tokens": self.prompt_tokens,
            "batch": self.batch,
            "prefill": self.prefill.to_dict(per_op),
            "decode": self.decode.to_dict(per_op),
            "vision": self.vision.to_dict(per_op) if self.vision else None,
            "kv_cache_prefill": self.kv_cache_prefill,
            "kv_cache_final": self.kv_cache_final,
            "weights": self.weights,
            "memory_needed": self.memory_needed,
            "time_to_first_token": self.time_to_first_token,
        }


def estimate(
    spec: DecoderSpec,
    hardware: Hardware,
    visual_tokens: int,
    text_tokens: int = 0,
    new_tokens: int = 0,
    batch: int = 1,
    precision: Precision | None = None,
    attention: Attention = "eager",
    encoder: EncoderSpec | None = None,
    projector: ProjectorSpec | None = None,
    convention: Convention = "llm-viewer",
) -> CostEstimate:
    """Cost of one LLaVA-style request.

    Args:
        spec: Decoder shapes.
        hardware: Device.
        visual_tokens: Visual tokens that reach the decoder (after any reduction).
        text_tokens: Text tokens of the prompt (system prompt, question, template).
        new_tokens: Generated tokens.
        batch: Batch size (one image per sample).
        precision: Bit widths (default W16A16KV16).
        attention: "eager", "flash" or "flash-llm-viewer".
        encoder: Vision encoder to include, or None for the decoder alone.
        projector: Projector shapes; default LLaVA mlp2x_gelu from the encoder width to the
            decoder width. Ignored without ``encoder``.
        convention: "llm-viewer" or "llm-viewer-2024-03" (decoder only; see layers.py).
    """
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 0:
        raise PrumergeError(f"text_tokens must be a non-negative integer, got {text_tokens!r}")
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, int) or visual_tokens < 0:
        raise PrumergeError(f"visual_tokens must be a non-negative integer, got {visual_tokens!r}")
    prompt = visual_tokens + text_tokens
    prefill = analyze_prefill(spec, hardware, prompt, batch, precision, attention, convention)
    decode = analyze_generation(
        spec, hardware, prompt, new_tokens, batch, precision, attention, convention
    )
    vision = None
    if encoder is not None and visual_tokens > 0:
        proj = projector or ProjectorSpec(encoder.width, spec.hidden_size)
        vision = analyze_vision(encoder, proj, hardware, visual_tokens, batch, precision, attention)
    return CostEstimate(visual_tokens, text_tokens, batch, prefill, decode, vision)
