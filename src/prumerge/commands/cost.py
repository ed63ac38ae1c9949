"""`prumerge cost`: what a LLaVA-style request costs, and saves, with fewer visual tokens.

Roofline estimates (LLM-Viewer conventions, see docs/cost.md) of the decoder prefill, the
decode steps and, with --vision, the vision encoder and projector, for each visual-token
count, with ratios against the first count. Every value is validated here rather than by
argparse, so that bad input is reported as one line (PrumergeError) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from prumerge.commands._args import int_arg
from prumerge.errors import PrumergeError

GB = 1e9  # LLM-Viewer and the paper report decimal gigabytes.

# The figures shown in the table and their ratios, as (label, getter, unit scale, digits).
_Row = tuple[str, Callable[[Any], float], float, int]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``cost`` subcommand."""
    p = subparsers.add_parser(
        "cost",
        help="roofline cost (FLOPs, time, memory) per visual-token count",
        description=(
            "Roofline estimate of prefill and decode cost for each visual-token count, "
            "following LLM-Viewer's conventions (docs/cost.md). The prompt is visual + text "
            "tokens. GB are 1e9 bytes."
        ),
    )
    p.add_argument(
        "--model",
        default="vicuna-7b",
        help="decoder preset or path to a llama-like config.json (default vicuna-7b)",
    )
    p.add_argument("--hardware", default=None, help="hardware preset (default v100), or 'custom'")
    p.add_argument(
        "--visual-tokens",
        default="576,144,32",
        help="comma-separated visual-token counts; ratios are against the first (default 576,144,32)",
    )
    p.add_argument("--text-tokens", default="64", help="text tokens in the prompt (default 64)")
    p.add_argument("--new-tokens", default="128", help="generated tokens (default 128)")
    p.add_argument("--batch", default="1", help="batch size (default 1)")
    p.add_argument("--w-bits", default="16", help="weight bits: 16, 8 or 4 (default 16)")
    p.add_argument("--a-bits", default="16", help="activation bits: 16, 8 or 4 (default 16)")
    p.add_argument("--kv-bits", default=None, help="KV-cache bits: 16, 8 or 4 (default: --a-bits)")
    p.add_argument("--attention", default=None, help="eager (default), flash, or flash-llm-viewer")
    p.add_argument("--flash-attention", action="store_true", help="same as --attention flash")
    p.add_argument(
        "--convention",
        default="llm-viewer",
        help="llm-viewer (default) or llm-viewer-2024-03 (the version the PruMerge paper's table matches)",
    )
    p.add_argument(
        "--vision",
        default=None,
        help="include a vision encoder + LLaVA projector: clip-vit-l-14-336 or dinov2-s-14",
    )
    p.add_argument(
        "--bandwidth",
        default=None,
        help="custom hardware: memory bandwidth in bytes/s (e.g. 900e9)",
    )
    p.add_argument(
        "--peak-fp16", default=None, help="custom hardware: peak FP16 ops/s (e.g. 112e12)"
    )
    p.add_argument("--peak-int8", default=None, help="custom hardware: peak INT8 ops/s (optional)")
    p.add_argument(
        "--onchip-buffer",
        default=None,
        help="custom hardware: on-chip buffer bytes (optional, FlashAttention blocks)",
    )
    p.add_argument(
        "--memory",
        default=None,
        help="custom hardware: device memory in bytes (optional; warns when a request needs more)",
    )
    p.add_argument(
        "--per-op", action="store_true", help="also show every operator of one prefill layer"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def _float(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise PrumergeError(f"{flag} must be a number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise PrumergeError(f"{flag} must be a positive finite number, got {value!r}")
    return number


def _bits(value: str, flag: str) -> int:
    key = str(value).strip().lower().removeprefix("fp").removeprefix("int")
    if key not in ("16", "8", "4"):
        raise PrumergeError(f"{flag} must be 16, 8 or 4, got {value!r}")
    return int(key)


def _counts(value: str) -> list[int]:
    parts = [part.strip() for part in str(value).split(",")]
    if not parts or any(not part for part in parts):
        raise PrumergeError(f"--visual-tokens must be comma-separated integers, got {value!r}")
    return [int_arg(part, "--visual-tokens", 0) for part in parts]


def _hardware(args: argparse.Namespace) -> Any:
    from prumerge.cost import custom_hardware, get_hardware

    numbers = {
        "--bandwidth": args.bandwidth,
        "--peak-fp16": args.peak_fp16,
        "--peak-int8": args.peak_int8,
        "--onchip-buffer": args.onchip_buffer,
        "--memory": args.memory,
    }
    given = [flag for flag, v in numbers.items() if v is not None]
    name = args.hardware if args.hardware is not None else ("custom" if given else "v100")
    if name.strip().lower() != "custom":
        if given:
            raise PrumergeError(f"{', '.join(given)} need --hardware custom")
        return get_hardware(name)
    bandwidth = _float(args.bandwidth, "--bandwidth")
    peak = _float(args.peak_fp16, "--peak-fp16")
    if bandwidth is None or peak is None:
        raise PrumergeError("--hardware custom needs --bandwidth and --peak-fp16")
    return custom_hardware(
        bandwidth,
        peak,
        _float(args.peak_int8, "--peak-int8"),
        _float(args.onchip_buffer, "--onchip-buffer"),
        memory=_float(args.memory, "--memory"),
    )


def _warn_if_too_big(results: list[Any], hardware: Any) -> None:
    """One stderr line when a request's weights and KV cache exceed the device's memory."""
    if hardware.memory is None:
        return
    worst = max(results, key=lambda e: e.memory_needed)
    if worst.memory_needed <= hardware.memory:
        return
    print(
        f"prumerge: warning: {worst.visual_tokens} visual tokens at batch {worst.batch} need at "
        f"least {_bytes(worst.memory_needed)} (weights {_bytes(worst.weights)}, KV cache "
        f"{_bytes(worst.kv_cache_final)}), more than {hardware.name} has "
        f"({_bytes(hardware.memory)}); the roofline times assume it fits",
        file=sys.stderr,
    )


def _bytes(value: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _ratio(value: float, base: float) -> float | None:
    return value / base if base else None


_ROWS: list[_Row] = [
    ("TFLOPs", lambda e: e.prefill.ops, 1e12, 3),
    ("prefill ms", lambda e: e.prefill.time, 1e-3, 2),
    ("decode ms/tok", lambda e: e.decode.time_per_token, 1e-3, 2),
    ("mem access GB", lambda e: e.prefill.memory_access, GB, 2),
    ("stored act GB", lambda e: e.prefill.store_act, GB, 3),
    ("KV cache GB", lambda e: e.kv_cache_final, GB, 3),
]
_VISION_ROWS: list[_Row] = [
    ("vision ms", lambda e: e.vision.time if e.vision else 0.0, 1e-3, 2),
    ("TTFT ms", lambda e: e.time_to_first_token, 1e-3, 2),
]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _per_op_table(stage: Any) -> str:
    header = ["operator", "GOPs", "load_w MB", "load_act MB", "store_act MB", "load_kv MB",
              "store_kv MB", "ops/byte", "bound", "us"]  # fmt: skip
    rows = []
    for r in (*stage.layer, *stage.extra):
        o = r.op
        rows.append(
            [o.name, f"{o.ops / 1e9:.3f}"]
            + [f"{x / 1e6:.2f}" for x in (o.load_weight, o.load_act, o.store_act, o.load_kv, o.store_kv)]
            + [f"{r.arithmetic_intensity:.1f}", r.bound, f"{r.time * 1e6:.1f}"]
        )  # fmt: skip
    note = f"(one of {stage.num_layers} layers; lm_head once)"
    return f"{note}\n{_table(header, rows)}"


def run(args: argparse.Namespace) -> int:
    """Compute and print the estimates. Returns the exit status."""
    from prumerge.cost import Precision, estimate, get_decoder, get_encoder
    from prumerge.cost.layers import check_attention, check_convention

    counts = _counts(args.visual_tokens)
    text = int_arg(args.text_tokens, "--text-tokens", 0)
    new = int_arg(args.new_tokens, "--new-tokens", 0)
    batch = int_arg(args.batch, "--batch", 1)
    if new > 100_000:
        raise PrumergeError(f"--new-tokens is too large ({new}); at most 100000")
    if any(c + text == 0 for c in counts):
        raise PrumergeError("the prompt is empty: a visual-token count and --text-tokens are 0")
    w = _bits(args.w_bits, "--w-bits")
    a = _bits(args.a_bits, "--a-bits")
    kv = a if args.kv_bits is None else _bits(args.kv_bits, "--kv-bits")
    precision = Precision(w, a, kv)
    if args.flash_attention and args.attention not in (None, "flash"):
        raise PrumergeError("--flash-attention conflicts with --attention " + str(args.attention))
    attention = check_attention("flash" if args.flash_attention else (args.attention or "eager"))
    convention = check_convention(args.convention)
    spec = get_decoder(args.model)
    hardware = _hardware(args)
    encoder = get_encoder(args.vision) if args.vision else None

    results = [
        estimate(spec, hardware, c, text, new, batch, precision, attention, encoder,
                 convention=convention)
        for c in counts
    ]  # fmt: skip
    rows = _ROWS + (_VISION_ROWS if encoder else [])
    peak = hardware.peak_ops(w, a, kv)
    _warn_if_too_big(results, hardware)

    if args.json:
        base = results[0]
        out: dict[str, object] = {
            "model": spec.to_dict(),
            "hardware": hardware.to_dict(),
            "peak_ops_used": peak,
            "precision": {"w_bits": w, "a_bits": a, "kv_bits": kv},
            "batch": batch,
            "attention": attention,
            "convention": convention,
            "text_tokens": text,
            "new_tokens": new,
            "vision_encoder": encoder.to_dict() if encoder else None,
            "units": {"time": "s", "memory": "bytes", "ops": "operations"},
            "results": [
                {
                    **e.to_dict(per_op=args.per_op),
                    "ratios": {label: _ratio(get(e), get(base)) for label, get, _, _ in rows},
                }
                for e in results
            ],
        }
        print(json.dumps(out, indent=2))
        return 0

    vision = f", vision {encoder.name} + mlp2x projector" if encoder else ""
    print(
        f"{spec.name} on {hardware.name} ({hardware.bandwidth / 1e9:g} GB/s, "
        f"{peak / 1e12:g} TOPS peak used), {precision.label()}, batch {batch}, "
        f"{attention} attention, convention {convention}{vision}"
    )
    print(
        f"prompt = visual + {text} text tokens; decode = {new} new tokens "
        "(ms/tok: mean over the steps; KV cache: after the last step); GB = 1e9 bytes"
    )
    header = ["visual", "prompt"] + [label for label, *_ in rows]
    print()
    print(
        _table(
            header,
            [
                [str(e.visual_tokens), str(e.prompt_tokens)]
                + [f"{get(e) / scale:.{digits}f}" for _, get, scale, digits in rows]
                for e in results
            ],
        )
    )
    base = results[0]
    print()
    print(f"relative to {base.visual_tokens} visual tokens")
    print(
        _table(
            header,
            [
                [str(e.visual_tokens), str(e.prompt_tokens)]
                + [
                    "-" if (r := _ratio(get(e), get(base))) is None else f"{r:.3f}"
                    for _, get, _, _ in rows
                ]
                for e in results
            ],
        )
    )
    if args.per_op:
        for e in results:
            print()
            print(f"prefill operators, {e.visual_tokens} visual + {text} text tokens")
            print(_per_op_table(e.prefill))
    return 0
