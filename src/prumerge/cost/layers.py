"""Operator lists for one decoder layer (prefill and decode), lm_head, the ViT and the projector.

The decoder formulas are LLM-Viewer's (hahnyuan/LLM-Viewer ``model_analyzer.py``, commit
472f71f, with the llama config ``configs/Llama.py``) term by term, quirks included, so that
totals can be checked against numbers computed with it (the PruMerge paper's efficiency
table). Notation: b batch, s sequence (prefill) or KV length (decode), H hidden, h heads,
kvh KV heads, D head dim, F intermediate (MLP) width, V vocab; w/a/kv bytes per weight/activation/KV
element. Every deliberate difference from LLM-Viewer is marked "differs:" and listed in
docs/cost.md.
"""

from __future__ import annotations

import math
from typing import Literal

from prumerge.cost.roofline import Op, Precision
from prumerge.cost.specs import DecoderSpec, EncoderSpec, ProjectorSpec
from prumerge.errors import PrumergeError

# eager: qk_matmul, softmax and sv_matmul as three operators with s^2 score traffic.
# flash: one fused operator whose only activation traffic is Q in and O (s x D per head) out.
# flash-llm-viewer: LLM-Viewer's fused operator as written, whose output term is s x s per
#   head (o_numel = seqlen * seqlen * ...), i.e. it keeps s^2 stores.
Attention = Literal["eager", "flash", "flash-llm-viewer"]
ATTENTIONS: tuple[str, ...] = ("eager", "flash", "flash-llm-viewer")

# Which LLM-Viewer to follow. "llm-viewer": its current source (commit 472f71f).
# "llm-viewer-2024-03": as it stood before commit df96a82 (2024-03-19), which the PruMerge
# paper's table (arXiv v1, 2024-03-22) matches: lm_head weights counted at one byte each
# whatever the weight width, and the prefill qk_matmul counting K twice instead of Q + K
# (before 40139d9; the same bytes unless a != kv bits); its fused attention read K and V
# as one tensor's worth of bytes (the factor 2 came in 472f71f).
Convention = Literal["llm-viewer", "llm-viewer-2024-03"]
CONVENTIONS: tuple[str, ...] = ("llm-viewer", "llm-viewer-2024-03")

# Elementwise costs in ops per element (LLM-Viewer): RMSNorm/LayerNorm 7 (sum, sub, pow, sum,
# div, mul, add), residual add 1, SiLU-and-multiply 2, softmax 5 (max, sub, exp, sum, div).
NORM_OPS = 7
ADD_OPS = 1
ACT_OPS = 2
SOFTMAX_OPS = 5


def check_attention(attention: str) -> Attention:
    """Validate an attention variant name."""
    if attention not in ATTENTIONS:
        raise PrumergeError(f"unknown attention {attention!r}; supported: {', '.join(ATTENTIONS)}")
    return attention  # type: ignore[return-value]


def check_convention(convention: str) -> Convention:
    """Validate a convention name."""
    if convention not in CONVENTIONS:
        raise PrumergeError(
            f"unknown convention {convention!r}; supported: {', '.join(CONVENTIONS)}"
        )
    return convention  # type: ignore[return-value]


def linear(
    name: str, ic: float, oc: float, tokens: float, p: Precision, to_kv_cache: bool = False
) -> Op:
    """A bias-free linear layer over ``tokens`` rows (b * s).

    OPs 2*ic*oc*b*s; load_weight ic*oc*w; load_act ic*b*s*a; store_act oc*b*s*a, or, for the
    k and v projections of a decoder, store_kv oc*b*s*kv instead (LLM-Viewer).
    """
    return Op(
        name,
        ops=2 * ic * oc * tokens,
        load_weight=ic * oc * p.w_byte,
        load_act=ic * tokens * p.a_byte,
        store_act=0.0 if to_kv_cache else oc * tokens * p.a_byte,
        store_kv=oc * tokens * p.kv_byte if to_kv_cache else 0.0,
    )


def elementwise(
    name: str, ops_per_element: float, elements: float, p: Precision, inputs: int = 1
) -> Op:
    """An elementwise operator: reads ``inputs`` tensors of ``elements``, writes one."""
    return Op(
        name,
        ops=ops_per_element * elements,
        load_act=inputs * elements * p.a_byte,
        store_act=elements * p.a_byte,
    )


def _flash_rows_per_block(head_size: int, p: Precision, onchip_buffer: float | None) -> int:
    """FlashAttention-2 row-block height as LLM-Viewer sizes it: min(ceil(M / (kv * D)), D)."""
    if onchip_buffer is None:
        return head_size
    return min(math.ceil(onchip_buffer / (p.kv_byte * head_size)), head_size)


def attention_prefill(
    b: int,
    s: int,
    heads: int,
    kv_heads: int,
    head_size: int,
    p: Precision,
    attention: Attention,
    onchip_buffer: float | None,
    kv_cached: bool = True,
    convention: Convention = "llm-viewer",
) -> list[Op]:
    """Self-attention over s tokens (prefill), after the projections.

    Args:
        kv_cached: Whether K and V come from a KV cache (decoder: counted as load_kv at kv
            bytes) or are plain activations (encoder: counted as load_act at a bytes).
        convention: See CONVENTIONS; only the qk_matmul and fused K/V reads depend on it.
    """
    a, kv = p.a_byte, p.kv_byte
    matmul_ops = 2 * s * s * head_size * heads * b  # per matmul: 2*s^2*D*h*b
    softmax_ops = SOFTMAX_OPS * b * heads * s * s
    scores = s * s * b * heads  # elements of the attention matrix, (b, h, s, s)
    k_elems = s * head_size * b * kv_heads  # elements of K, and of V: (b, kvh, s, D)
    # Bytes of one K (or V) read, and which memory term it goes to.
    k_cache_read = k_elems * kv if kv_cached else 0.0
    k_act_read = 0.0 if kv_cached else k_elems * a

    if attention == "eager":
        # qk reads the query as s*D*b*kvh*a: kvh, not h, is LLM-Viewer's formula (since its
        # commit 40139d9); the two agree for multi-head attention. Before that commit it read
        # no query and K twice (load_kv 2*s*D*b*kvh*kv).
        if convention == "llm-viewer-2024-03" and kv_cached:
            q_read, k_read = 0.0, 2 * k_cache_read
        else:
            q_read, k_read = k_elems * a, k_cache_read
        qk = Op(
            "qk_matmul",
            matmul_ops,
            load_act=q_read + k_act_read,
            store_act=scores * a,
            load_kv=k_read,
        )
        softmax = Op("softmax", softmax_ops, load_act=scores * a, store_act=scores * a)
        sv = Op(
            "sv_matmul",
            matmul_ops,
            load_act=scores * a + k_act_read,
            store_act=s * head_size * b * heads * a,
            load_kv=k_cache_read,
        )
        return [qk, softmax, sv]

    # Fused attention (FlashAttention-2, arXiv 2307.08691) as LLM-Viewer models it: Q is read
    # once, O is written twice (initialise and save), and K and V are streamed once per
    # row block of Q, for every query head (h, not kvh).
    rows = _flash_rows_per_block(head_size, p, onchip_buffer)
    n_blocks = math.ceil(s / rows)
    q_bytes = s * head_size * b * heads * a
    if attention == "flash-llm-viewer":
        o_bytes = s * s * b * heads * a  # LLM-Viewer's o_numel, as written
    else:
        o_bytes = s * head_size * b * heads * a  # differs: O is s x D per head
    kv_factor = 1 if convention == "llm-viewer-2024-03" and kv_cached else 2
    kv_bytes = n_blocks * s * head_size * b * heads * (kv if kv_cached else a) * kv_factor
    fused = Op(
        "fused_attention",
        2 * matmul_ops + softmax_ops,
        load_act=q_bytes + (0.0 if kv_cached else kv_bytes),
        store_act=2 * o_bytes,
        load_kv=kv_bytes if kv_cached else 0.0,
    )
    return [fused]


def decoder_prefill_ops(
    spec: DecoderSpec,
    batch: int,
    seq_len: int,
    p: Precision,
    attention: Attention = "eager",
    onchip_buffer: float | None = None,
    convention: Convention = "llm-viewer",
) -> list[Op]:
    """Operators of one decoder layer in prefill (LLM-Viewer, stage "prefill")."""
    b, s, H, F = batch, seq_len, spec.hidden_size, spec.intermediate_size
    h, kvh, D = spec.num_heads, spec.num_kv_heads, spec.head_size
    t = b * s
    ops = [
        elementwise("attn_norm", NORM_OPS, b * H * s, p),
        linear("q_proj", H, h * D, t, p),
        linear("k_proj", H, kvh * D, t, p, to_kv_cache=True),
        linear("v_proj", H, kvh * D, t, p, to_kv_cache=True),
        *attention_prefill(b, s, h, kvh, D, p, attention, onchip_buffer, True, convention),
        linear("out_proj", h * D, H, t, p),
        elementwise("attn_add", ADD_OPS, b * H * s, p),
        elementwise("mlp_norm", NORM_OPS, b * H * s, p),
        linear("gate_proj", H, F, t, p),
        linear("up_proj", H, F, t, p),
        # LLM-Viewer counts SiLU(gate) * up over b*H*s elements (H, not F), reading two.
        elementwise("mlp_act", ACT_OPS, b * H * s, p, inputs=2),
        linear("down_proj", F, H, t, p),
        elementwise("mlp_add", ADD_OPS, b * H * s, p),
    ]
    return ops


def decoder_decode_ops(
    spec: DecoderSpec,
    batch: int,
    kv_len: int,
    p: Precision,
    attention: Attention = "eager",
    onchip_buffer: float | None = None,
    convention: Convention = "llm-viewer",
) -> list[Op]:
    """Operators of one decoder layer for one new token attending to ``kv_len`` positions."""
    b, s, H, F = batch, kv_len, spec.hidden_size, spec.intermediate_size
    h, kvh, D = spec.num_heads, spec.num_kv_heads, spec.head_size
    a, kv = p.a_byte, p.kv_byte
    matmul_ops = 2 * s * D * h * b  # 1 query row against s keys (and s values)
    softmax_ops = SOFTMAX_OPS * b * h * s
    if attention == "eager":
        attn = [
            Op(
                "qk_matmul",
                matmul_ops,
                load_act=D * b * h * a,
                store_act=s * b * h * a,
                load_kv=s * D * b * kvh * kv,
            ),
            Op("softmax", softmax_ops, load_act=b * h * s * a, store_act=b * h * s * a),
            Op(
                "sv_matmul",
                matmul_ops,
                load_act=s * b * h * a,
                store_act=D * b * h * a,
                load_kv=s * D * b * kvh * kv,
            ),
        ]
    else:
        # One row block (ceil(1 / rows) = 1); K and V read once per query head.
        o_elems = s if attention == "flash-llm-viewer" else D  # differs: O is 1 x D per head
        kv_factor = 1 if convention == "llm-viewer-2024-03" else 2
        attn = [
            Op(
                "fused_attention",
                2 * matmul_ops + softmax_ops,
                load_act=D * b * h * a,
                store_act=2 * o_elems * b * h * a,
                load_kv=s * D * b * h * kv * kv_factor,
            )
        ]
    return [
        elementwise("attn_norm", NORM_OPS, b * H, p),
        linear("q_proj", H, h * D, b, p),
        linear("k_proj", H, kvh * D, b, p, to_kv_cache=True),
        linear("v_proj", H, kvh * D, b, p, to_kv_cache=True),
        *attn,
        linear("out_proj", h * D, H, b, p),
        elementwise("attn_add", ADD_OPS, b * H, p),
        elementwise("mlp_norm", NORM_OPS, b * H, p),
        linear("gate_proj", H, F, b, p),
        linear("up_proj", H, F, b, p),
        elementwise("mlp_act", ACT_OPS, b * H, p, inputs=2),
        linear("down_proj", F, H, b, p),
        elementwise("mlp_add", ADD_OPS, b * H, p),
    ]


def lm_head_op(
    spec: DecoderSpec, batch: int, p: Precision, convention: Convention = "llm-viewer"
) -> Op:
    """The output projection for the last position only (LLM-Viewer ``post_process``).

    OPs b*H*V (LLM-Viewer counts one op per multiply-add here, unlike the linears);
    load_weight H*V*w (H*V, one byte each, in the 2024-03 convention); load_act H*a and
    store_act V*a, without the batch factor, as written.
    """
    H, V = spec.hidden_size, spec.vocab_size
    w_byte = 1.0 if convention == "llm-viewer-2024-03" else p.w_byte
    return Op(
        "lm_head",
        ops=batch * H * V,
        load_weight=H * V * w_byte,
        load_act=H * p.a_byte,
        store_act=V * p.a_byte,
    )


def encoder_layer_ops(
    spec: EncoderSpec,
    batch: int,
    p: Precision,
    attention: Attention = "eager",
    onchip_buffer: float | None = None,
) -> list[Op]:
    """Operators of one pre-norm ViT layer over all of its tokens.

    LLM-Viewer has no ViT, so this extends its conventions: the same norm, attention, add and
    linear formulas; K and V are activations (no cache); the plain GELU MLP is fc1 -> GELU ->
    fc2, with the activation counted as 2 ops per element of the F-wide tensor, one input.
    """
    b, s, W, F = batch, spec.num_tokens, spec.width, spec.intermediate_size
    h, D = spec.num_heads, spec.head_size
    t = b * s
    scale = [elementwise("attn_scale", 1, b * W * s, p)] if spec.layer_scale else []
    mlp_scale = [elementwise("mlp_scale", 1, b * W * s, p)] if spec.layer_scale else []
    return [
        elementwise("attn_norm", NORM_OPS, b * W * s, p),
        linear("q_proj", W, W, t, p),
        linear("k_proj", W, W, t, p),
        linear("v_proj", W, W, t, p),
        *attention_prefill(b, s, h, h, D, p, attention, onchip_buffer, kv_cached=False),
        linear("out_proj", W, W, t, p),
        *scale,
        elementwise("attn_add", ADD_OPS, b * W * s, p),
        elementwise("mlp_norm", NORM_OPS, b * W * s, p),
        linear("fc1", W, F, t, p),
        elementwise("mlp_act", ACT_OPS, b * F * s, p),
        linear("fc2", F, W, t, p),
        *mlp_scale,
        elementwise("mlp_add", ADD_OPS, b * W * s, p),
    ]


def encoder_embed_ops(spec: EncoderSpec, batch: int, p: Precision) -> list[Op]:
    """Operators that run once before the layers: patch embedding, position add, pre-norm."""
    b, W = batch, spec.width
    patch_in = spec.channels * spec.patch_size * spec.patch_size
    ops = [
        # The patch convolution is a linear over flattened patches (stride = kernel).
        linear("patch_embed", patch_in, W, b * spec.num_patches, p),
        elementwise("pos_add", ADD_OPS, b * W * spec.num_tokens, p),
    ]
    if spec.pre_norm:
        ops.append(elementwise("pre_norm", NORM_OPS, b * W * spec.num_tokens, p))
    return ops


def projector_ops(spec: ProjectorSpec, batch: int, tokens: int, p: Precision) -> list[Op]:
    """LLaVA mlp2x_gelu projector over the visual tokens that reach it (after reduction)."""
    t = batch * tokens
    return [
        linear("proj_fc1", spec.in_features, spec.out_features, t, p),
        elementwise("proj_act", ACT_OPS, t * spec.out_features, p),
        linear("proj_fc2", spec.out_features, spec.out_features, t, p),
    ]
