"""Measured speed of visual-token reduction, beside the cost model's prediction.

The logic of ``prumerge bench``: every configuration (a method at a budget, and the ``none``
baseline) runs the same batches of (image, question) pairs through ``generate`` with a fixed
number of new tokens. Configurations are timed round-robin, the starting one rotating each
round, after warm-up rounds, so drift on a shared machine hits all of them alike. Each round
gives one sample per configuration (the mean over its batches); the report gives the median
and the min-max over rounds, and speedups as the median of the per-round paired ratios
against ``none``.

The prediction uses ``prumerge.cost`` on the model's own decoder config, for the same prompt
shapes as measured: each batch's padded prompt length with the full visual tokens and with
the reduced ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.methods.spec import (
    MethodSpec,
    budget_key,
    make_method,
    make_spec,
    parse_budget,
    parse_spec,
    split_spec,
)

AUTO = "auto"
ADAPTIVE = "adaptive"


def parse_configs(
    methods: str, keeps: str | None = None, options: dict[str, Any] | None = None
) -> list[MethodSpec]:
    """The configurations to time, ``none`` first.

    Args:
        methods: comma-separated method names, each optionally with its own budget
            (``pool@64``, ``prumerge@adaptive``).
        keeps: comma-separated budgets for the methods given without one: counts (64),
            ratios (0.25) or ``adaptive`` (the method's default: adaptive for prumerge and
            prumerge+, its default budget for the others; ``auto`` is a synonym). Default
            ``adaptive``. ``1`` (one token) and ``1.0`` (all of them) are different budgets.
        options: method options (text or values), given to every listed method that takes
            them.

    Raises:
        PrumergeError: unknown methods or options, bad budgets, nothing to compare.
    """
    from prumerge.methods import METHODS, method_names
    from prumerge.methods.base import option_defaults

    options = dict(options or {})
    if "keep" in options:
        raise PrumergeError("give budgets with --keep or METHOD@BUDGET, not as an option")
    budgets = [
        parse_budget(k, what="--keep", adaptive=True) for k in (keeps or ADAPTIVE).split(",")
    ]
    entries = [e.strip() for e in methods.split(",")]
    if not methods.strip() or any(not e for e in entries):
        raise PrumergeError(f"--methods must be comma-separated method names, got {methods!r}")

    wanted: list[tuple[str, str | None]] = []
    for entry in entries:
        name, budget_text = split_spec(entry)
        if name not in METHODS:
            raise PrumergeError(f"unknown method {name!r}; available: {', '.join(method_names())}")
        takes_keep = "keep" in option_defaults(METHODS[name])
        if budget_text is not None:
            if not takes_keep:
                raise PrumergeError(f"method {name!r} takes no budget, got {entry!r}")
            parse_budget(budget_text, what=f"--methods {entry}", adaptive=True)
            wanted.append((name, entry))
        elif takes_keep:
            wanted += [(name, b) for b in budgets]  # type: ignore[misc]
        else:
            wanted.append((name, None))

    listed = {name for name, _ in wanted if name != "none"}
    for key in options:
        if not any(key in option_defaults(METHODS[n]) for n in listed):
            raise PrumergeError(f"no method in --methods takes option {key!r}")

    configs = [MethodSpec("none")]
    seen: set[tuple[str, tuple[str, float]]] = set()
    for name, budget in wanted:
        if name == "none":
            continue
        defaults = option_defaults(METHODS[name])
        chosen = {k: v for k, v in options.items() if k in defaults}
        if isinstance(budget, str):  # METHOD@BUDGET
            spec = parse_spec(budget, chosen, what=f"--methods {budget}", check=False)
        else:
            spec = make_spec(name, chosen, check=False).with_budget(budget)
        if (name, budget_key(spec.budget)) in seen:
            continue
        seen.add((name, budget_key(spec.budget)))
        make_method(name, spec.options)  # bad values fail here, before the model loads
        configs.append(spec)
    return configs


# -- measuring -----------------------------------------------------------------------------
class MemoryMeter:
    """Peak memory of one run, measured honestly or not at all.

    - CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak; ``peak`` is that
      peak, ``growth`` the peak minus what was allocated before the run (activations, KV
      cache, the run's temporaries).
    - CPU on Linux: the process's peak resident set size is reset (``/proc/self/clear_refs``)
      and read back (``VmHWM``); ``growth`` is the peak minus the resident size before the
      run. Memory the allocator kept from earlier runs is reused without growing the RSS, so
      this is a lower bound of what the run needed beyond the weights.
    - Elsewhere: ``kind`` is None and nothing is reported.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind: str | None = None
        self._before = 0
        if device.type == "cuda":
            self.kind = "cuda max_memory_allocated"
        elif device.type == "cpu" and self._reset_rss_peak() and self._status("VmHWM"):
            self.kind = "peak RSS growth (Linux VmHWM after reset minus VmRSS before)"

    @staticmethod
    def _reset_rss_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # 5 resets the peak RSS (Linux >= 4.0)
        except OSError:
            return False
        return True

    @staticmethod
    def _status(key: str) -> int | None:
        """A ``/proc/self/status`` size in bytes."""
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024  # reported in kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    def start(self) -> None:
        if self.kind is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_rss_peak()
            self._before = self._status("VmRSS") or 0

    def stop(self) -> dict[str, int] | None:
        """``{"peak": bytes, "growth": bytes}`` of the run since ``start``, or None."""
        if self.kind is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status("VmHWM") or 0
        return {"peak": peak, "growth": max(peak - self._before, 0)}


@dataclass
class Batch:
    """One batch of (image, prompt) pairs, processed once.

    Attributes:
        inputs: processor outputs on the model's device.
        text_tokens: per row, prompt tokens that are not image placeholders.
        image_names: per row, the image's name.
    """

    inputs: dict[str, torch.Tensor]
    text_tokens: list[int]
    image_names: list[str]


@dataclass
class Sample:
    """One configuration in one round: per-request means over the batches."""

    vision: float
    reduce: float
    prefill: float
    generate: float
    decode_tokens_per_second: float | None
    memory: dict[str, int] | None

    @property
    def tower_projector(self) -> float:
        return self.vision - self.reduce

    @property
    def time_to_first_token(self) -> float:
        return self.vision + self.prefill

    @property
    def end_to_end(self) -> float:
        return self.vision + self.prefill + self.generate


@dataclass
class Observed:
    """What one configuration did, apart from time: tokens and answers of its last round."""

    tokens_in: list[int] = field(default_factory=list)
    tokens_out: list[int] = field(default_factory=list)
    llm_full_layers: int = 0
    answers: list[str] = field(default_factory=list)


def make_batches(
    model: Any,
    processor: Any,
    prompt: str,
    images: Sequence[Any],
    names: Sequence[str],
    batch: int,
) -> list[Batch]:
    """Cut the images into batches of ``batch``, cycling through them to fill the last one."""
    from prumerge.generation import prepare_inputs

    count = math.ceil(len(images) / batch) * batch
    order = [i % len(images) for i in range(count)]
    image_token_id = model.config.image_token_id
    batches = []
    for start in range(0, count, batch):
        rows = order[start : start + batch]
        inputs = prepare_inputs(model, processor, [images[i] for i in rows], [prompt] * len(rows))
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        text = (mask.sum(dim=1) - ((ids == image_token_id) & (mask > 0)).sum(dim=1)).tolist()
        batches.append(Batch(inputs, [int(t) for t in text], [names[i] for i in rows]))
    return batches


def measure(
    model: Any,
    processor: Any,
    batches: list[Batch],
    configs: list[MethodSpec],
    *,
    repeats: int,
    warmup: int,
    new_tokens: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[Sample]], dict[str, Observed], str | None]:
    """Time every configuration round-robin.

    Returns:
        ``(samples, observed, memory_kind)``: per label, one ``Sample`` per timed round, and
        what the last round saw; ``memory_kind`` says how memory was measured (None: not).
    """
    import prumerge
    from prumerge.generation import timed_generate

    meter = MemoryMeter(model.device)
    methods = {c.label: c.build() for c in configs}
    samples: dict[str, list[Sample]] = {c.label: [] for c in configs}
    observed: dict[str, Observed] = {c.label: Observed() for c in configs}
    rounds = warmup + repeats
    for round_index in range(rounds):
        if progress:
            kind = "warm-up" if round_index < warmup else "timed"
            progress(f"round {round_index + 1}/{rounds} ({kind})")
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            totals = dict(vision=0.0, reduce=0.0, prefill=0.0, generate=0.0)
            decoded = decode_time = 0.0
            peaks: list[dict[str, int]] = []
            seen = Observed()
            for batch in batches:
                with prumerge.apply(model, methods[config.label]) as handle:
                    meter.start()
                    timing, texts = timed_generate(
                        model,
                        processor,
                        handle,
                        batch.inputs,
                        max_new_tokens=new_tokens,
                        force_new_tokens=True,
                    )
                    memory = meter.stop()
                    stats = handle.stats
                for key in totals:
                    totals[key] += getattr(timing, key)
                if timing.steps > 1:
                    decoded += timing.rows * (timing.steps - 1)
                    decode_time += timing.generate
                if memory is not None:
                    peaks.append(memory)
                seen.tokens_in += stats.tokens_in
                seen.tokens_out += stats.tokens_out
                seen.llm_full_layers = int(getattr(stats, "llm_full_layers", 0) or 0)
                seen.answers += texts
            observed[config.label] = seen
            if round_index < warmup:
                continue
            n = len(batches)
            samples[config.label].append(
                Sample(
                    vision=totals["vision"] / n,
                    reduce=totals["reduce"] / n,
                    prefill=totals["prefill"] / n,
                    generate=totals["generate"] / n,
                    decode_tokens_per_second=decoded / decode_time if decode_time > 0 else None,
                    memory={k: max(p[k] for p in peaks) for k in peaks[0]} if peaks else None,
                )
            )
    return samples, observed, meter.kind


# -- predicting ----------------------------------------------------------------------------
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


# -- reporting -----------------------------------------------------------------------------
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
