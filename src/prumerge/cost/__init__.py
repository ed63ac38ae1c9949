"""Roofline cost model (LLM-Viewer conventions) for LLaVA-style models with fewer visual tokens.

Pure Python: no torch import. Typical use::

    from prumerge.cost import estimate, get_decoder, get_hardware

    full = estimate(get_decoder("vicuna-7b"), get_hardware("v100"), visual_tokens=576,
                    text_tokens=64, new_tokens=128)
    full.prefill.ops, full.prefill.time, full.prefill.memory_access, full.prefill.store_act

The formulas and their sources are written out in docs/cost.md.
"""

from prumerge.cost.estimate import (
    CostEstimate,
    DecodeSummary,
    VisionResult,
    analyze_decode,
    analyze_generation,
    analyze_prefill,
    analyze_vision,
    estimate,
)
from prumerge.cost.hardware import HARDWARE, Hardware, custom_hardware, get_hardware
from prumerge.cost.layers import ATTENTIONS, CONVENTIONS, Attention, Convention
from prumerge.cost.roofline import Op, OpResult, Precision, StageResult, analyze_stage, roofline
from prumerge.cost.specs import (
    DECODERS,
    ENCODERS,
    DecoderSpec,
    EncoderSpec,
    ProjectorSpec,
    decoder_from_config,
    get_decoder,
    get_encoder,
)

__all__ = [
    "ATTENTIONS",
    "CONVENTIONS",
    "DECODERS",
    "ENCODERS",
    "HARDWARE",
    "Attention",
    "Convention",
    "CostEstimate",
    "DecodeSummary",
    "DecoderSpec",
    "EncoderSpec",
    "Hardware",
    "Op",
    "OpResult",
    "Precision",
    "ProjectorSpec",
    "StageResult",
    "VisionResult",
    "analyze_decode",
    "analyze_generation",
    "analyze_prefill",
    "analyze_stage",
    "analyze_vision",
    "custom_hardware",
    "decoder_from_config",
    "estimate",
    "get_decoder",
    "get_encoder",
    "get_hardware",
    "roofline",
]
