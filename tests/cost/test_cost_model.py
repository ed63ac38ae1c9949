"""Properties of the cost model: monotonicity, quantisation rules, presets, the paper's row."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prumerge.cost import (
    ATTENTIONS,
    DECODERS,
    ENCODERS,
    HARDWARE,
    Precision,
    analyze_prefill,
    analyze_vision,
    custom_hardware,
    decoder_from_config,
    estimate,
    get_decoder,
    get_encoder,
    get_hardware,
)
from prumerge.cost.specs import ProjectorSpec
from prumerge.errors import PrumergeError

V100 = get_hardware("v100")
VICUNA = get_decoder("vicuna-7b")


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(sorted(DECODERS)),
    attention=st.sampled_from(ATTENTIONS),
    bits=st.sampled_from([(16, 16, 16), (8, 8, 8), (4, 16, 16), (4, 8, 4)]),
    batch=st.integers(1, 8),
    s=st.integers(1, 3000),
    extra=st.integers(1, 500),
)
def test_monotonic_in_token_count(model, attention, bits, batch, s, extra) -> None:
    spec = get_decoder(model)
    p = Precision(*bits)
    short = analyze_prefill(spec, V100, s, batch, p, attention)
    long = analyze_prefill(spec, V100, s + extra, batch, p, attention)
    for key in ("ops", "memory_access", "load_act", "store_act", "store_kv"):
        assert long.totals[key] > short.totals[key], key
    assert long.totals["load_weight"] == short.totals["load_weight"]
    assert long.time >= short.time


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_quantisation_halves_and_quarters(attention) -> None:
    def total(bits: tuple[int, int, int], key: str) -> float:
        return analyze_prefill(VICUNA, V100, 256, 2, Precision(*bits), attention).totals[key]

    # Weights: W8 halves and W4 quarters the weight bytes; nothing else moves.
    assert total((8, 16, 16), "load_weight") == total((16, 16, 16), "load_weight") / 2
    assert total((4, 16, 16), "load_weight") == total((16, 16, 16), "load_weight") / 4
    assert total((4, 16, 16), "store_act") == total((16, 16, 16), "store_act")
    # Activations and the KV cache follow their own widths.
    assert total((16, 8, 16), "store_act") == total((16, 16, 16), "store_act") / 2
    assert total((16, 16, 4), "store_kv") == total((16, 16, 16), "store_kv") / 4
    assert total((16, 16, 8), "load_kv") == total((16, 16, 16), "load_kv") / 2
    # OPs do not depend on bit widths.
    assert total((4, 8, 4), "ops") == total((16, 16, 16), "ops")


def test_kv_bits_default_to_activation_bits() -> None:
    assert Precision(16, 8).kv == 8
    assert Precision(16, 8).label() == "W16A8KV8"


def test_int8_peak_rule() -> None:
    hw = get_hardware("a100-40g")
    assert hw.peak_ops(8, 8, 8) == 624e12
    assert hw.peak_ops(4, 8, 4) == 624e12  # INT4 runs at the INT8 peak
    assert hw.peak_ops(8, 16, 8) == 312e12  # any width above 8 bits: FP16 peak
    assert hw.peak_ops(4, 8, 16) == 312e12
    assert custom_hardware(1e12, 1e14).peak_ops(8, 8, 8) == 1e14  # no INT8 figure given
    # A compute-bound prefill runs twice as fast at W8A8KV8 on an A100 ...
    fp16 = analyze_prefill(VICUNA, hw, 2048, 8, Precision(16, 16, 16))
    int8 = analyze_prefill(VICUNA, hw, 2048, 8, Precision(8, 8, 8))
    assert int8.time < 0.6 * fp16.time


# The PruMerge paper's V100 FP16 Vicuna-7B prefill rows: TFLOPs, ms, GB accessed, GB stored.
PAPER = {700: (9.3, 88.6, 23.3, 4.60), 70: (0.91, 15.3, 13.7, 0.28)}


def _row(s: int, convention: str) -> tuple[float, float, float, float]:
    r = analyze_prefill(VICUNA, V100, s, convention=convention)  # type: ignore[arg-type]
    return r.ops / 1e12, r.time * 1e3, r.memory_access / 1e9, r.store_act / 1e9


@pytest.mark.parametrize("s", sorted(PAPER))
def test_paper_row_reproduced(s: int) -> None:
    ours = _row(s, "llm-viewer-2024-03")
    paper = PAPER[s]
    for name, got, want in zip(("TFLOPs", "ms", "GB", "act GB"), ours, paper, strict=True):
        if (s, name) == (70, "act GB"):
            # 0.2839 GB, which LLM-Viewer displays as "284M" and the paper prints as 0.28:
            # the paper's figure is rounded to 2 decimals, coarser than 1%.
            assert round(got, 2) == want
        else:
            assert got == pytest.approx(want, rel=0.01), name


def test_paper_full_row_within_1pct_with_current_llm_viewer_too() -> None:
    for got, want in zip(_row(700, "llm-viewer"), PAPER[700], strict=True):
        assert got == pytest.approx(want, rel=0.01)


def test_paper_row_matches_llm_viewer_display_digits() -> None:
    # LLM-Viewer (2024-03) shows one decimal: 9.3T / 88.6ms / 23.3G / 4.6G and 910G / 15.3ms
    # / 13.7G / 284M. Our values give exactly those strings.
    full, pm = _row(700, "llm-viewer-2024-03"), _row(70, "llm-viewer-2024-03")
    assert [f"{x:.1f}" for x in full] == ["9.3", "88.6", "23.3", "4.6"]
    assert (f"{pm[0] * 1e3:.0f}", f"{pm[1]:.1f}", f"{pm[2]:.1f}", f"{pm[3] * 1e3:.0f}") == (
        "910",
        "15.3",
        "13.7",
        "284",
    )


@pytest.mark.parametrize("name", sorted(HARDWARE))
@pytest.mark.parametrize("model", sorted(DECODERS))
def test_every_preset_runs(name: str, model: str) -> None:
    e = estimate(get_decoder(model), get_hardware(name), 32, 16, 4)
    assert e.prefill.ops > 0 and e.prefill.time > 0 and e.decode.time_per_token > 0
    assert all(math.isfinite(v) for v in e.prefill.totals.values())


def test_preset_shapes() -> None:
    smol = get_decoder("smollm2-135m")
    assert (smol.hidden_size, smol.num_layers, smol.num_heads, smol.num_kv_heads) == (576, 30, 9, 3)
    assert (smol.intermediate_size, smol.vocab_size, smol.head_size) == (1536, 49152, 64)
    assert get_hardware("H200").bandwidth == 4.8e12
    assert get_hardware("h200").peak_fp16 == 989.5e12
    assert get_hardware("nvidia_V100") is V100  # LLM-Viewer's spelling
    assert get_encoder("clip-vit-l-14-336").num_tokens == 577
    assert get_encoder("dinov2-s-14").num_tokens == 257


def test_unknown_names_list_what_is_supported() -> None:
    with pytest.raises(PrumergeError, match="v100.*h200"):
        get_hardware("tpu-v9")
    with pytest.raises(PrumergeError, match="vicuna-7b.*smollm2-135m"):
        get_decoder("gpt-5")
    with pytest.raises(PrumergeError, match="clip-vit-l-14-336"):
        get_encoder("siglip")


def test_hf_config(tmp_path) -> None:
    cfg = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = get_decoder(str(tmp_path))  # a folder works as well as the file
    smol = get_decoder("smollm2-135m")
    assert analyze_prefill(spec, V100, 100).totals == analyze_prefill(smol, V100, 100).totals
    # A LLaVA config: the decoder is its text_config; no num_key_value_heads means MHA.
    del cfg["num_key_value_heads"]
    (tmp_path / "llava.json").write_text(json.dumps({"text_config": cfg, "model_type": "llava"}))
    assert decoder_from_config(tmp_path / "llava.json").num_kv_heads == 9
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PrumergeError, match="num_attention_heads"):
        decoder_from_config(tmp_path / "bad.json")


def test_generation_and_kv_cache() -> None:
    e = estimate(VICUNA, V100, 576, 64, 10)
    # 10 decode steps with KV lengths 640..649 (LLM-Viewer's analyze_generate_task).
    assert e.decode.steps == 10
    assert e.decode.first is not None and e.decode.first.layer[4].op.load_kv == 640 * 128 * 32 * 2
    # K and V: 2 * layers * tokens * kv_heads * head_dim * 2 bytes.
    assert e.kv_cache_prefill == 2 * 32 * 640 * 32 * 128 * 2
    assert e.kv_cache_final == 2 * 32 * 650 * 32 * 128 * 2
    assert e.decode.time_per_token == pytest.approx(e.decode.time / 10)


def test_vision_encoder_fixed_projector_scales() -> None:
    clip = get_encoder("clip")
    proj = ProjectorSpec(1024, 4096)
    full = analyze_vision(clip, proj, V100, 576)
    pruned = analyze_vision(clip, proj, V100, 32)
    assert full.encoder.totals == pruned.encoder.totals  # PruMerge acts after the encoder
    assert pruned.projector.ops == pytest.approx(full.projector.ops * 32 / 576)
    # Linears dominate: about 2 * params * tokens, params = 24 * 12 * 1024^2 (+ patch embed).
    linear = 2 * 24 * 12 * 1024**2 * 577
    assert linear < full.encoder.ops < 1.25 * linear
    e = estimate(VICUNA, V100, 32, 64, 0, encoder=clip)
    assert e.vision is not None
    assert e.time_to_first_token == pytest.approx(e.prefill.time + e.vision.time)


def test_bad_arguments() -> None:
    with pytest.raises(PrumergeError):
        analyze_prefill(VICUNA, V100, 0)
    with pytest.raises(PrumergeError):
        analyze_prefill(VICUNA, V100, 10, batch=0)
    with pytest.raises(PrumergeError):
        analyze_prefill(VICUNA, V100, 10, attention="sparse")  # type: ignore[arg-type]
    with pytest.raises(PrumergeError):
        Precision(0, 16)
    with pytest.raises(PrumergeError):
        custom_hardware(-1, 1e12)


def test_encoder_presets_run() -> None:
    for name in ENCODERS:
        r = analyze_vision(get_encoder(name), ProjectorSpec(64, 64), V100, 8)
        assert r.encoder.ops > 0 and r.projector.ops > 0
