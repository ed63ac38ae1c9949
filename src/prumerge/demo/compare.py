"""The demo page's logic, without a browser: run several methods on one image and question.

``compare`` answers one question about one image with ``none`` and each chosen method in
turn, on one loaded model, and returns per method what ``prumerge ask`` prints (answer,
visual tokens in and out, vision / prefill / generation seconds), the kept-token picture that
``ask --show`` draws, and the cost model's predicted prefill speedup over ``none`` on a GPU
preset (the same prediction as ``prumerge bench``: this model's own decoder config and dtype,
the prompt lengths actually run). ``table`` lays the results out as the page shows them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from prumerge.errors import PrumergeError

# A page request may list at most this many configurations (methods x budgets, none included);
# each one is a full generate call.
MAX_CONFIGS = 12

#: ``progress(done, total, message)``: called before each configuration runs.
Progress = Callable[[int, int, str], None]


@dataclass
class MethodResult:
    """One configuration's run on the image.

    Attributes:
        label: the configuration, as ``prumerge bench`` names it (``prumerge``, ``pool@64``).
        method: the registered method name.
        answer: the generated answer.
        tokens_in: patch tokens of the image.
        tokens_out: visual tokens the LLM saw (FastV: from its layer K on).
        llm_full_layers: LLM layers that saw all ``tokens_in`` (FastV's K, else 0).
        vision, prefill, generate: seconds, as ``prumerge.generation.Timing`` splits them
            (the median over ``repeats`` timed runs).
        new_tokens: tokens generated.
        predicted_prefill_speedup: the cost model's ``none`` prefill time over this one's.
        measured_prefill_speedup: the measured ``none`` prefill time over this one's.
        picture: the kept-token picture (``prumerge.viz.render_reduction``), or None when the
            patch grid is not square.
    """

    label: str
    method: str
    answer: str
    tokens_in: int
    tokens_out: int
    llm_full_layers: int
    vision: float
    prefill: float
    generate: float
    new_tokens: int
    predicted_prefill_speedup: float = 1.0
    measured_prefill_speedup: float = 1.0
    picture: Image.Image | None = None


@dataclass
class Comparison:
    """Every configuration's result on one (image, question), ``none`` first."""

    question: str
    hardware: str
    precision_bits: int
    repeats: int
    results: list[MethodResult] = field(default_factory=list)


class DemoModel:
    """A loaded model with what the page needs beside it; one request runs at a time.

    Args:
        model, processor, prompt: as ``prumerge.loading.load_model`` returns them.
        name: how the page names the model.
    """

    def __init__(self, model: Any, processor: Any, prompt: Callable[[str], str], name: str):
        from prumerge.bench import decoder_spec, model_attention, model_precision

        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.name = name
        self.spec = decoder_spec(model, name)
        self.precision = model_precision(model)
        self.attention = model_attention(model)
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        device: str | None = "cpu",
        cache_dir: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
    ) -> DemoModel:
        """The default model (``model=None``, ``"default"`` or ``"default:base"``) or a
        Hugging Face id or directory of any supported family; the rest as ``prumerge.loading.load_model``."""
        from prumerge.loading import load_model

        loaded, processor, prompt = load_model(
            model, device=device, cache_dir=cache_dir, dtype=dtype, device_map=device_map
        )
        name = model or "default model (DINOv2-S/14 + SmolLM2-135M)"
        return cls(loaded, processor, prompt, name)

    @property
    def device(self) -> str:
        from prumerge.loading import model_device

        return str(model_device(self.model))

    def warm_up(self) -> None:
        """One short untimed generation, so the first request's timings are not cold."""
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        compare(self, image, "What is in the image?", [], max_new_tokens=2, pictures=False)


def choose_configs(methods: Sequence[str], budgets: str | None = None) -> list[Any]:
    """A ``prumerge.methods.spec.MethodSpec`` per (method, budget), ``none`` first and always.

    Args:
        methods: registered method names (``none`` may be among them; it runs once).
        budgets: comma-separated budgets for the methods that take one, as
            ``prumerge bench --keep`` reads them: ``auto`` (the method's default; adaptive for
            prumerge and prumerge+), counts (64) or ratios of the patches (0.25).

    Raises:
        PrumergeError: an unknown method, a bad budget, or too many configurations.
    """
    from prumerge.bench import parse_configs
    from prumerge.methods.spec import MethodSpec

    names = [m.strip() for m in methods if m.strip() and m.strip() != "none"]
    text = (budgets or "").strip() or "auto"
    if not names:
        return [MethodSpec("none")]
    try:
        configs = parse_configs(",".join(names), text)
    except PrumergeError as exc:  # the page's field is "budgets", not the CLI's --keep
        raise PrumergeError(str(exc).replace("--keep:", "budget:", 1)) from None
    if len(configs) > MAX_CONFIGS:
        raise PrumergeError(
            f"{len(configs)} configurations (methods x budgets, none included) is too many "
            f"for one request; at most {MAX_CONFIGS}"
        )
    return configs


def patch_grid(tokens: int) -> tuple[int, int] | None:
    """(rows, cols) of a square patch grid of ``tokens`` patches, or None if not square."""
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def compare(
    demo: DemoModel,
    image: Image.Image,
    question: str,
    configs: Sequence[Any],
    *,
    hardware: str = "v100",
    max_new_tokens: int = 16,
    repeats: int = 1,
    pictures: bool = True,
    progress: Progress | None = None,
) -> Comparison:
    """Answer ``question`` about ``image`` with ``none`` and each configuration.

    Args:
        demo: the loaded model.
        image: an RGB image (``prumerge.images.load_image`` reads files robustly).
        question: the question; blank is an error.
        configs: from ``choose_configs``; ``none`` is added first when missing.
        hardware: a cost-model GPU preset (``prumerge cost --hardware`` names).
        max_new_tokens: answer length limit (greedy decoding stops earlier at end of text).
        repeats: timed runs per configuration; with more than one, a warm-up run comes
            first and the times are medians, as in ``prumerge ask --repeats``.
        pictures: draw the kept-token pictures.
        progress: called before each configuration.

    Raises:
        PrumergeError: a blank question, a bad number or an unknown preset.
    """
    import prumerge
    from prumerge.bench import Observed, make_batches, predict
    from prumerge.cost import get_hardware
    from prumerge.generation import generate_answers
    from prumerge.methods.spec import MethodSpec
    from prumerge.viz import render_reduction

    question = question.strip()
    if not question:
        raise PrumergeError("the question is empty")
    if max_new_tokens < 1:
        raise PrumergeError("max new tokens must be at least 1")
    if repeats < 1:
        raise PrumergeError("timed runs must be at least 1")
    preset = get_hardware(hardware)
    configs = list(configs)
    if not configs or configs[0].label != "none":
        configs = [MethodSpec("none")] + [c for c in configs if c.label != "none"]
    text = demo.prompt(question)
    comparison = Comparison(question, preset.name, demo.precision.w_bits, repeats)
    with demo.lock:
        batch = make_batches(demo.model, demo.processor, text, [image], ["image"], 1)
        predicted: dict[str, float] = {}
        for done, config in enumerate(configs):
            if progress:
                progress(done, len(configs), f"running {config.label}")
            with prumerge.apply(demo.model, config.build(), processor=demo.processor) as handle:
                answer = generate_answers(
                    demo.model,
                    demo.processor,
                    handle,
                    [image],
                    [text],
                    max_new_tokens=max_new_tokens,
                    repeats=repeats,
                )
                reduction = handle.last_reduction
                full_layers = int(getattr(handle.stats, "llm_full_layers", 0) or 0)
            observed = Observed(answer.tokens_in, answer.tokens_out, full_layers, answer.texts)
            predicted[config.label] = predict(
                demo.spec,
                preset,
                demo.precision,
                demo.attention,
                batch,
                observed,
                max_new_tokens,
            ).prefill_time
            picture = None
            grid = patch_grid(answer.tokens_in[0])
            if pictures and reduction is not None and grid is not None:
                picture = render_reduction(
                    image, reduction.index[0].cpu(), reduction.assignment[0].cpu(), grid
                )
            timing = answer.timing
            comparison.results.append(
                MethodResult(
                    label=config.label,
                    method=config.method,
                    answer=answer.texts[0],
                    tokens_in=answer.tokens_in[0],
                    tokens_out=answer.tokens_out[0],
                    llm_full_layers=full_layers,
                    vision=timing.vision,
                    prefill=timing.prefill,
                    generate=timing.generate,
                    new_tokens=timing.new_tokens,
                    picture=picture,
                )
            )
        if progress:
            progress(len(configs), len(configs), "done")
    base = comparison.results[0]
    for result in comparison.results:
        result.predicted_prefill_speedup = predicted["none"] / predicted[result.label]
        result.measured_prefill_speedup = base.prefill / max(result.prefill, 1e-9)
    return comparison


# Row labels of the results table, in order.
ROWS = (
    "answer",
    "visual tokens in -> out",
    "vision ms",
    "prefill ms",
    "generation ms (new tokens)",
    "prefill speedup, measured",
    "prefill speedup, predicted on {hardware}",
)


def table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: one column per configuration, ``none`` first, one row per quantity."""
    headers = [""] + [r.label for r in comparison.results]
    rows: list[list[str]] = [[label.format(hardware=comparison.hardware)] for label in ROWS]
    for r in comparison.results:
        tokens = f"{r.tokens_in} -> {r.tokens_out}"
        if r.llm_full_layers:
            tokens += f" (from LLM layer {r.llm_full_layers})"
        cells = [
            r.answer,
            tokens,
            f"{r.vision * 1e3:.0f}",
            f"{r.prefill * 1e3:.0f}",
            f"{r.generate * 1e3:.0f} ({r.new_tokens})",
            f"{r.measured_prefill_speedup:.2f}x",
            f"{r.predicted_prefill_speedup:.2f}x",
        ]
        for row, cell in zip(rows, cells, strict=True):
            row.append(cell)
    return headers, rows


def captions(comparison: Comparison) -> list[tuple[Image.Image, str]]:
    """The kept-token pictures with their captions, in table order (configs without one skipped)."""
    out = []
    for r in comparison.results:
        if r.picture is None:
            continue
        caption = f"{r.label}: {r.tokens_in} -> {r.tokens_out} tokens"
        if r.llm_full_layers:
            caption += " (pruned inside the LLM; the picture shows the vision side)"
        out.append((r.picture, caption))
    return out
