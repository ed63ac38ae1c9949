"""Predicting: the cost model's prefill and decode cost for the prompt shapes measured."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prumerge.bench.measure import Batch, Observed

AUTO = "auto"


def decoder_spec(model: Any, name: str) -> Any:
    """The cost model's ``DecoderSpec`` of this model, read from its own config."""
    from prumerge.cost import decoder_from_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        model.config.to_json_file(str(path), use_diff=False)
        spec = decoder_from_config(path)
    return dataclasses.replace(spec, name=name)


def model_precision(model: Any) -> Any:
    """Bit widths of the model's floating-point dtype (weights, activations, KV cache)."""
    from prumerge.cost import Precision

    bits = torch.finfo(model.dtype).bits
    return Precision(bits, bits, bits)


def model_attention(model: Any) -> str:
    """The cost model's attention variant for the LLM's attention implementation."""
    text = model.config.get_text_config()
    implementation = getattr(text, "_attn_implementation", None) or "eager"
    # SDPA and FlashAttention never store the s x s score matrix; eager does.
    return "eager" if implementation == "eager" else "flash"


def hardware_for(name: str | None, device: torch.device) -> Any:
    """A hardware preset by name; ``auto``/None: the CUDA device's preset if known, else V100."""
    from prumerge.cost import get_hardware

    if name and name.strip().lower() != AUTO:
        return get_hardware(name)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = props.name.lower()
        for key, preset in (
            ("h200", "h200"),
            ("v100", "v100"),
            ("a6000", "a6000"),
            ("l40", "l40"),
            ("a40", "a40"),
        ):
            if key in gpu:
                return get_hardware(preset)
        if "h100" in gpu:
            return get_hardware("h100-pcie" if "pcie" in gpu else "h100-sxm")
        if "a100" in gpu:
            return get_hardware("a100-80g" if props.total_memory > 50e9 else "a100-40g")
    return get_hardware("v100")  # the PruMerge paper's


def _stage_sum(result: Any, full: Any, full_layers: int, key: str) -> float:
    """A stage total where the first ``full_layers`` layers see the full prompt (FastV)."""
    if full_layers <= 0:
        return float(result.totals[key])
    layers = result.num_layers
    k = min(full_layers, layers)
    per_layer_full = sum(r.get(key) for r in full.layer)
    per_layer = sum(r.get(key) for r in result.layer)
    return k * per_layer_full + (layers - k) * per_layer + sum(r.get(key) for r in result.extra)


@dataclass
class Prediction:
    """Cost-model totals for one configuration over its batches (one request each)."""

    prefill_ops: float
    prefill_time: float
    decode_time: float | None
    prompt_lengths: list[int]


def predict(
    spec: Any,
    hardware: Any,
    precision: Any,
    attention: str,
    batches: list[Batch],
    observed: Observed,
    new_tokens: int,
) -> Prediction:
    """Prefill and decode cost of the prompts this configuration actually ran.

    Each batch's prompt is its longest row (rows are padded to it): text tokens plus the
    visual tokens the LLM saw. The decode steps after the first token attend to prompt + 1
    ... prompt + new_tokens - 1 cached positions, as measured.
    """
    from prumerge.cost import analyze_decode, analyze_prefill

    ops = prefill_time = 0.0
    decode_time: float | None = 0.0 if new_tokens > 1 else None
    lengths = []
    row = 0
    k = observed.llm_full_layers
    for batch in batches:
        rows = len(batch.text_tokens)
        tokens_in = observed.tokens_in[row : row + rows]
        tokens_out = observed.tokens_out[row : row + rows]
        row += rows
        full = max(t + n for t, n in zip(batch.text_tokens, tokens_in, strict=True))
        seq = max(t + n for t, n in zip(batch.text_tokens, tokens_out, strict=True))
        lengths.append(seq)
        args = (spec, hardware)
        reduced_stage = analyze_prefill(*args, seq, rows, precision, attention)  # type: ignore[arg-type]
        full_stage = analyze_prefill(*args, full, rows, precision, attention) if k else None  # type: ignore[arg-type]
        ops += _stage_sum(reduced_stage, full_stage, k, "ops")
        prefill_time += _stage_sum(reduced_stage, full_stage, k, "time")
        if decode_time is not None:
            for step in range(1, new_tokens):
                step_reduced = analyze_decode(*args, seq + step, rows, precision, attention)  # type: ignore[arg-type]
                step_full = (
                    analyze_decode(*args, full + step, rows, precision, attention)  # type: ignore[arg-type]
                    if k
                    else None
                )
                decode_time += _stage_sum(step_reduced, step_full, k, "time")
    n = len(batches)
    return Prediction(
        prefill_ops=ops / n,
        prefill_time=prefill_time / n,
        decode_time=None if decode_time is None else decode_time / n,
        prompt_lengths=lengths,
    )
