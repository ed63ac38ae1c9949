"""Reporting: one JSON-ready row per configuration, the text tables and the plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from prumerge.bench.measure import Observed, Sample
from prumerge.bench.predict import Prediction
from prumerge.errors import PrumergeError
from prumerge.methods.spec import MethodSpec


def spread(values: Sequence[float | None]) -> dict[str, float] | None:
    """Median, min and max of the values that exist."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


METRICS: dict[str, Callable[[Sample], float | None]] = {
    "vision": lambda s: s.vision,
    "tower_projector": lambda s: s.tower_projector,
    "reduce": lambda s: s.reduce,
    "prefill": lambda s: s.prefill,
    "time_to_first_token": lambda s: s.time_to_first_token,
    "decode": lambda s: s.generate,
    "end_to_end": lambda s: s.end_to_end,
}
# Speedups are base / config for times; decode speed is a rate, so config / base.
SPEEDUPS: dict[str, Callable[[Sample], float | None]] = {
    "prefill": lambda s: s.prefill,
    "time_to_first_token": lambda s: s.time_to_first_token,
    "decode": lambda s: s.generate,
    "end_to_end": lambda s: s.end_to_end,
}


def _paired_speedup(base: list[Sample], mine: list[Sample], metric: Callable) -> dict | None:
    ratios = []
    for b, m in zip(base, mine, strict=True):
        bv, mv = metric(b), metric(m)
        ratios.append(bv / mv if bv is not None and mv else None)
    return spread(ratios)


def _best_speedup(base: list[Sample], mine: list[Sample], metric: Callable) -> float | None:
    """Ratio of the best (smallest) times: on a contended CPU the least disturbed rounds."""
    bv = [v for v in map(metric, base) if v is not None]
    mv = [v for v in map(metric, mine) if v is not None]
    return min(bv) / min(mv) if bv and mv and min(mv) > 0 else None


def summarise(
    configs: list[MethodSpec],
    samples: dict[str, list[Sample]],
    observed: dict[str, Observed],
    predictions: dict[str, Prediction],
) -> list[dict[str, Any]]:
    """One JSON-ready row per configuration."""
    base_samples = samples["none"]
    base_prediction = predictions["none"]
    rows = []
    for config in configs:
        mine = samples[config.label]
        seen = observed[config.label]
        prediction = predictions[config.label]
        memory = [s.memory for s in mine if s.memory is not None]
        decode_prediction = None
        if prediction.decode_time and base_prediction.decode_time:
            decode_prediction = base_prediction.decode_time / prediction.decode_time
        rows.append(
            {
                "label": config.label,
                "method": config.method,
                "options": config.build().options(),
                "tokens_in": seen.tokens_in,
                "tokens_out": seen.tokens_out,
                "mean_tokens_in": statistics.fmean(seen.tokens_in),
                "mean_tokens_out": statistics.fmean(seen.tokens_out),
                "llm_full_layers": seen.llm_full_layers,
                "prompt_tokens": prediction.prompt_lengths,
                "seconds": {name: spread([f(s) for s in mine]) for name, f in METRICS.items()},
                "decode_tokens_per_second": spread([s.decode_tokens_per_second for s in mine]),
                "peak_memory_bytes": spread([m["peak"] for m in memory]) if memory else None,
                "memory_growth_bytes": spread([m["growth"] for m in memory]) if memory else None,
                "speedup": {
                    name: _paired_speedup(base_samples, mine, f) for name, f in SPEEDUPS.items()
                },
                "speedup_of_best": {
                    name: _best_speedup(base_samples, mine, f) for name, f in SPEEDUPS.items()
                },
                "predicted": {
                    "prefill_tflops": prediction.prefill_ops / 1e12,
                    "prefill_seconds": prediction.prefill_time,
                    "decode_seconds": prediction.decode_time,
                    "speedup": {
                        "prefill_flops": base_prediction.prefill_ops / prediction.prefill_ops,
                        "prefill_roofline": base_prediction.prefill_time / prediction.prefill_time,
                        "decode_roofline": decode_prediction,
                    },
                },
                "samples": {name: [f(s) for s in mine] for name, f in METRICS.items()},
                "answers": seen.answers,
            }
        )
    return rows


def _ms(entry: dict[str, float] | None, digits: int = 0) -> str:
    if entry is None:
        return "n/a"
    m, lo, hi = (entry[k] * 1e3 for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def _plain(entry: dict[str, float] | None, digits: int = 1, scale: float = 1.0) -> str:
    if entry is None:
        return "n/a"
    m, lo, hi = (entry[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The two tables (times, speedups) and the notes that say what they mean."""
    setup = report["setup"]
    cost = report["cost_model"]
    memory_kind = report["memory"]
    small = setup["device"] == "cpu"
    digits = (
        1
        if any((r["seconds"]["reduce"] or {}).get("median", 1) < 0.01 for r in report["results"])
        else 0
    )
    times = []
    for r in report["results"]:
        s = r["seconds"]
        growth = r["memory_growth_bytes"]
        times.append(
            [
                r["label"],
                f"{r['mean_tokens_in']:.0f} -> {r['mean_tokens_out']:.1f}",
                _ms(s["tower_projector"]),
                _ms(s["reduce"], digits),
                _ms(s["prefill"]),
                _ms(s["time_to_first_token"]),
                _plain(r["decode_tokens_per_second"]),
                _ms(s["end_to_end"]),
                _plain(growth, 0 if small else 1, 1 / 2**20) if growth else "n/a",
            ]
        )
    speed = []
    for r in report["results"]:
        sp, pred = r["speedup"], r["predicted"]["speedup"]
        speed.append(
            [
                r["label"],
                " / ".join(str(n) for n in r["prompt_tokens"]),
                _plain(sp["prefill"], 2),
                _x(r["speedup_of_best"]["prefill"]),
                _x(pred["prefill_flops"]),
                _x(pred["prefill_roofline"]),
                _plain(sp["time_to_first_token"], 2),
                _plain(sp["decode"], 2),
                _x(pred["decode_roofline"]),
                _plain(sp["end_to_end"], 2),
            ]
        )
    hw = cost["hardware"]["name"]
    lines = [
        f"prumerge bench: {setup['model']} on {setup['device']} ({setup['dtype']}"
        + (f", torch threads: {setup['torch_threads']}), " if small else "), ")
        + f"batch {setup['batch']}, {setup['images']} image(s) in {setup['batches']} batch(es), "
        f"{setup['new_tokens']} new tokens, {setup['warmup']} warm-up + {setup['repeats']} "
        "timed rounds, round-robin",
        "",
        "per request, median [min-max] over rounds; vision = tower + projector, reduce = the "
        "method alone, TTFT = vision + reduce + prefill",
        _table(
            [
                "config",
                "visual tokens",
                "vision ms",
                "reduce ms",
                "prefill ms",
                "TTFT ms",
                "decode tok/s",
                "end-to-end ms",
                "mem MiB",
            ],
            times,
        ),
        "",
        "speedup vs none: measured = median [min-max] of per-round paired ratios, and best = "
        "ratio of the fastest rounds (prefill); predicted = cost model for the same prompt "
        "shapes: FLOPs ratio (any hardware; the compute-bound limit) and roofline time ratio "
        f"on {hw}",
        _table(
            [
                "config",
                "prompt tokens",
                "prefill",
                "best",
                "pred FLOPs",
                f"pred {hw}",
                "TTFT",
                "decode",
                f"pred decode {hw}",
                "end-to-end",
            ],
            speed,
        ),
        "",
        f"cost model: decoder {cost['decoder']['name']} ({cost['decoder']['num_layers']} layers, "
        f"hidden {cost['decoder']['hidden_size']}), {cost['precision']}-bit, "
        f"{cost['attention']} attention; memory: "
        + (memory_kind or "n/a (no honest measure on this device)"),
    ]
    return "\n".join(lines)


def save_plot(report: dict[str, Any], path: str) -> str:
    """Stacked time-to-first-token parts and measured vs predicted prefill speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [r["label"] for r in rows]
    xs = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4))
    bottom = [0.0] * len(rows)
    for key, name in (("tower_projector", "vision"), ("reduce", "reduce"), ("prefill", "prefill")):
        heights = [r["seconds"][key]["median"] * 1e3 for r in rows]
        left.bar(xs, heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    left.set_xticks(list(xs), labels, rotation=30, ha="right")
    left.set_ylabel("time to first token, ms (median)")
    left.legend()
    width = 0.27
    measured = [r["speedup"]["prefill"] for r in rows]
    med = [m["median"] for m in measured]
    err = [[m["median"] - m["min"] for m in measured], [m["max"] - m["median"] for m in measured]]
    right.bar([x - width for x in xs], med, width, yerr=err, capsize=3, label="measured")
    right.bar(
        xs,
        [r["predicted"]["speedup"]["prefill_flops"] for r in rows],
        width,
        label="predicted, FLOPs",
    )
    hw = report["cost_model"]["hardware"]["name"]
    right.bar(
        [x + width for x in xs],
        [r["predicted"]["speedup"]["prefill_roofline"] for r in rows],
        width,
        label=f"predicted, roofline {hw}",
    )
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xticks(list(xs), labels, rotation=30, ha="right")
    right.set_ylabel("prefill speedup vs none")
    right.legend(fontsize="small")
    fig.suptitle(f"{report['setup']['model']} on {report['setup']['device']}", fontsize="medium")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise PrumergeError(f"cannot write {path}: {exc}") from None
    finally:
        plt.close(fig)
    return path


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)
