"""Every operator of a tiny decoder against values worked out by hand from LLM-Viewer's
formulas (docs/cost.md), and the roofline arithmetic on a toy device."""

from __future__ import annotations

import pytest

from prumerge.cost import (
    DecoderSpec,
    Hardware,
    Op,
    Precision,
    analyze_decode,
    analyze_prefill,
    roofline,
)
from prumerge.cost.layers import (
    attention_prefill,
    decoder_decode_ops,
    decoder_prefill_ops,
    lm_head_op,
)

# H=8, h=2, kvh=1 (GQA), D=4, F=12, V=10, 2 layers. FP16: 2 bytes for w, a and kv.
TINY = DecoderSpec("tiny", 8, 2, 2, 1, 12, 10)
FP16 = Precision(16, 16, 16)


def as_tuple(op: Op) -> tuple[float, ...]:
    return (op.ops, op.load_weight, op.load_act, op.store_act, op.load_kv, op.store_kv)


# Prefill, b=2, s=3 (6 token rows). Columns: OPs, load_w, load_act, store_act, load_kv, store_kv.
PREFILL_B2_S3 = {
    "attn_norm": (336, 0, 96, 96, 0, 0),  # 7*b*H*s; b*H*s*a in and out
    "q_proj": (768, 128, 96, 96, 0, 0),  # 2*8*8*6; 8*8*2; 8*6*2; 8*6*2
    "k_proj": (384, 64, 96, 0, 0, 48),  # oc = kvh*D = 4: output goes to the KV cache
    "v_proj": (384, 64, 96, 0, 0, 48),
    "qk_matmul": (288, 0, 48, 72, 48, 0),  # 2*s^2*D*h*b; s*D*b*kvh*a; s^2*b*h*a; s*D*b*kvh*kv
    "softmax": (180, 0, 72, 72, 0, 0),  # 5*b*h*s^2; s^2*b*h*a in and out
    "sv_matmul": (288, 0, 72, 96, 48, 0),  # scores in; s*D*b*h*a out; V from the cache
    "out_proj": (768, 128, 96, 96, 0, 0),
    "attn_add": (48, 0, 96, 96, 0, 0),  # b*H*s
    "mlp_norm": (336, 0, 96, 96, 0, 0),
    "gate_proj": (1152, 192, 96, 144, 0, 0),  # 2*8*12*6; 8*12*2; 8*6*2; 12*6*2
    "up_proj": (1152, 192, 96, 144, 0, 0),
    "mlp_act": (96, 0, 192, 96, 0, 0),  # 2*b*H*s; two inputs of b*H*s*a (H, not F)
    "down_proj": (1152, 192, 144, 96, 0, 0),
    "mlp_add": (48, 0, 96, 96, 0, 0),
}
LM_HEAD_B2 = (160, 160, 16, 20, 0, 0)  # b*H*V; H*V*w; H*a; V*a (no batch factor)

# One decode step, b=2, KV length 5.
DECODE_B2_KV5 = {
    "attn_norm": (112, 0, 32, 32, 0, 0),
    "q_proj": (256, 128, 32, 32, 0, 0),
    "k_proj": (128, 64, 32, 0, 0, 16),
    "v_proj": (128, 64, 32, 0, 0, 16),
    "qk_matmul": (160, 0, 32, 40, 80, 0),  # 2*s*D*h*b; D*b*h*a; s*b*h*a; s*D*b*kvh*kv
    "softmax": (100, 0, 40, 40, 0, 0),  # 5*b*h*s
    "sv_matmul": (160, 0, 40, 32, 80, 0),
    "out_proj": (256, 128, 32, 32, 0, 0),
    "attn_add": (16, 0, 32, 32, 0, 0),
    "mlp_norm": (112, 0, 32, 32, 0, 0),
    "gate_proj": (384, 192, 32, 48, 0, 0),
    "up_proj": (384, 192, 32, 48, 0, 0),
    "mlp_act": (32, 0, 64, 32, 0, 0),
    "down_proj": (384, 192, 48, 32, 0, 0),
    "mlp_add": (16, 0, 32, 32, 0, 0),
}


def test_prefill_operators_by_hand() -> None:
    ops = {op.name: as_tuple(op) for op in decoder_prefill_ops(TINY, 2, 3, FP16)}
    assert ops == PREFILL_B2_S3
    assert as_tuple(lm_head_op(TINY, 2, FP16)) == LM_HEAD_B2


def test_decode_operators_by_hand() -> None:
    ops = {op.name: as_tuple(op) for op in decoder_decode_ops(TINY, 2, 5, FP16)}
    assert ops == DECODE_B2_KV5


def test_fused_attention_by_hand() -> None:
    # b=2, s=3, h=2, kvh=1, D=4. Without an on-chip size the row block is D=4 tall: 1 block.
    (flash,) = attention_prefill(2, 3, 2, 1, 4, FP16, "flash", None)
    # OPs 2*288 + 180; Q in s*D*b*h*a = 96; O out twice, s*D*b*h*a each; K and V streamed
    # once per row block for each query head: 1*s*D*b*h*kv*2 = 192.
    assert as_tuple(flash) == (756, 0, 96, 192, 192, 0)
    (viewer,) = attention_prefill(2, 3, 2, 1, 4, FP16, "flash-llm-viewer", None)
    assert viewer.store_act == 2 * 3 * 3 * 2 * 2 * 2  # LLM-Viewer's o_numel is s*s*b*h*a
    # A 16-byte buffer holds ceil(16 / (2 * 4)) = 2 rows: s=9 needs ceil(9/2) = 5 blocks.
    (blocked,) = attention_prefill(1, 9, 2, 1, 4, FP16, "flash", 16)
    assert blocked.load_kv == 5 * 9 * 4 * 1 * 2 * 2 * 2
    # The 2024-03 convention read K and V as one tensor's worth (no factor 2).
    (old,) = attention_prefill(1, 9, 2, 1, 4, FP16, "flash", 16, convention="llm-viewer-2024-03")
    assert old.load_kv == blocked.load_kv / 2


def test_2024_03_convention_by_hand() -> None:
    ops = {
        op.name: op for op in decoder_prefill_ops(TINY, 2, 3, FP16, convention="llm-viewer-2024-03")
    }
    qk = ops["qk_matmul"]
    assert (qk.load_act, qk.load_kv) == (0, 96)  # no query read; K counted twice
    assert lm_head_op(TINY, 2, FP16, "llm-viewer-2024-03").load_weight == 80  # 1 byte per weight


def test_roofline_regimes() -> None:
    op = Op("q", ops=768, load_weight=128, load_act=96, store_act=96)  # 320 bytes, 2.4 ops/B
    mem = roofline(op, bandwidth=100, peak=1000)  # ridge at 10 ops/byte
    assert mem.bound == "memory"
    assert mem.arithmetic_intensity == pytest.approx(2.4)
    assert mem.performance == pytest.approx(240)
    assert mem.time == pytest.approx(3.2)  # = bytes / bandwidth
    comp = roofline(op, bandwidth=100, peak=100)  # ridge at 1 op/byte
    assert comp.bound == "compute"
    assert comp.time == pytest.approx(7.68)  # = ops / peak


def test_stage_totals_are_layers_times_layer_plus_lm_head() -> None:
    hw = Hardware("toy", bandwidth=100, peak_fp16=1000)
    r = analyze_prefill(TINY, hw, 3, batch=2)
    layer_ops = sum(v[0] for v in PREFILL_B2_S3.values())
    assert r.ops == 2 * layer_ops + LM_HEAD_B2[0]
    layer_bytes = sum(sum(v[1:]) for v in PREFILL_B2_S3.values())
    assert r.memory_access == 2 * layer_bytes + sum(LM_HEAD_B2[1:])
    assert r.store_act == 2 * sum(v[3] for v in PREFILL_B2_S3.values()) + LM_HEAD_B2[3]
    assert r.totals["store_kv"] == 2 * 96  # K and V of 6 rows, 4 wide, 2 bytes, 2 layers
    # Every toy operator is memory-bound here (intensity < 10), so time = bytes / bandwidth.
    assert all(x.bound == "memory" for x in r.layer + r.extra)
    assert r.time == pytest.approx(r.memory_access / 100)
    d = analyze_decode(TINY, hw, 5, batch=2)
    assert d.ops == 2 * sum(v[0] for v in DECODE_B2_KV5.values()) + LM_HEAD_B2[0]


def test_head_dim_other_than_hidden_over_heads() -> None:
    spec = DecoderSpec("wide-heads", 8, 1, 2, 1, 12, 10, head_dim=6)
    ops = {op.name: op for op in decoder_prefill_ops(spec, 1, 3, FP16)}
    assert ops["q_proj"].ops == 2 * 8 * 12 * 3  # h*D = 12 outputs
    assert ops["k_proj"].store_kv == 6 * 3 * 2  # kvh*D = 6 outputs to the cache
    assert ops["out_proj"].load_weight == 12 * 8 * 2
