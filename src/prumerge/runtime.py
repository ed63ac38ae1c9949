"""Loading a model for the CLI and eval, and running one timed generation."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_keep(text: str) -> int | float:
    """``--keep`` values: ``64`` is a count, ``0.25`` a ratio of the patch tokens."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if value.is_integer() and "." not in text:
        return int(value)
    return value


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` method options, with Python literals (ints, floats, bools, None) decoded."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise PrumergeError(f"method option {pair!r} is not KEY=VALUE")
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            value: Any = lowered == "true"
        elif lowered == "none":
            value = None
        else:
            try:
                value = parse_keep(raw)
            except ValueError:
                value = raw
        options[key.strip().replace("-", "_")] = value
    return options


def default_variant(model: str | None) -> str | None:
    """The embedded model's variant that ``--model`` names, or None for a Hugging Face model.

    ``None`` and ``"default"`` mean the default variant; ``"default:base"`` (any
    ``default:VARIANT``) a named one. Unknown variants get a one-line error.
    """
    if model is None or model == "default":
        return "default"
    if not model.startswith("default:"):
        return None
    from prumerge.models.default import VARIANTS

    variant = model.split(":", 1)[1]
    if variant not in VARIANTS:
        raise PrumergeError(
            f"--model {model}: unknown variant; choose default:{' or default:'.join(VARIANTS)}"
        )
    return variant


def load_model(
    model: str | None,
    *,
    device: str = "cpu",
    cache_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
):
    """``(model, processor, prompt_fn)`` for the default model (None, ``"default"`` or
    ``"default:base"``) or an HF id/directory.

    ``prompt_fn(question)`` formats one question about one image with the model's template.
    ``dtype`` is a torch dtype or its name ("float16", "bfloat16", "auto"); default float32.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    variant = default_variant(model)
    if variant is not None:
        from prumerge.models.default import format_prompt, load_default_model

        loaded, processor = load_default_model(
            cache_dir=cache_dir,
            device=device,
            dtype=_dtype(dtype) or torch.float32,
            variant=variant,
        )
        return loaded, processor, lambda question: format_prompt(processor, question)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(model).expanduser()
    if not path.exists() and not _HUB_ID.match(model):
        raise PrumergeError(f"model path does not exist: {model}")
    try:
        loaded = LlavaForConditionalGeneration.from_pretrained(
            str(path) if path.exists() else model
        )
        processor = AutoProcessor.from_pretrained(str(path) if path.exists() else model)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "directory" if path.exists() else "hub id (is the network reachable?)"
        raise PrumergeError(f"cannot load model from {where} {model!r}: {first}") from None
    loaded = loaded.to(device).eval()

    def prompt(question: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's format

    return loaded, processor, prompt


def _dtype(name: str | torch.dtype | None) -> Any:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise PrumergeError(f"unknown dtype {name!r}; use float32, float16, bfloat16 or auto")
    return value


@dataclass
class Timing:
    """Seconds spent in one generate call, split at the first token.

    Attributes:
        vision: vision tower + reduction + projector (from the call's start until the
            projector's output is ready).
        prefill: from there to the first token's logits: placeholder shrinking, embedding
            and the LLM's prompt pass.
        generate: from the first token's logits to the end (the decode steps).
        new_tokens: non-padding tokens generated over all rows.
        reduce: the method's ``reduce`` alone (a part of ``vision``).
        steps: tokens generated per row (the generated sequence length).
        rows: sequences in the batch.
    """

    vision: float = 0.0
    prefill: float = 0.0
    generate: float = 0.0
    new_tokens: int = 0
    reduce: float = 0.0
    steps: int = 0
    rows: int = 0

    @property
    def total(self) -> float:
        return self.vision + self.prefill + self.generate

    @property
    def time_to_first_token(self) -> float:
        return self.vision + self.prefill

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens per second over the batch after the first token (None if undefined).

        The first token comes out of the prefill pass, so ``steps - 1`` decode passes follow
        it, each giving one token per row.
        """
        if self.steps < 2 or self.generate <= 0:
            return None
        return self.rows * (self.steps - 1) / self.generate


@dataclass
class Answer:
    texts: list[str]
    tokens_in: list[int]
    tokens_out: list[int]
    timing: Timing
    timings: list[Timing] = field(default_factory=list)


class _FirstTokenClock:
    """A logits processor that only records when generate first asks for logits.

    generate calls it right after the prefill forward pass, so its first call splits the
    prompt phase from the decoding phase without running anything twice. On CUDA it waits for
    the queued prefill kernels first, so the clock reads when the logits exist, not when they
    were queued.
    """

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            synchronize(scores.device)
            self.first = time.perf_counter()
        return scores


class _VisionClock:
    """Times the method's ``reduce`` and the end of the projector in one patched call.

    A forward hook on the projector and a wrapper around this one method instance's
    ``reduce`` (an instance attribute shadowing the class's method), both removed on exit.
    Each reading synchronises CUDA first, so the split is correct with asynchronous kernels.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.device = handle.model.device
        self.reduce = 0.0
        self.projector_end: float | None = None
        self._hook: Any = None
        self._shadowed: Any = None

    def _projector_done(self, _module: Any, _inputs: Any, _output: Any) -> None:
        synchronize(self.device)
        self.projector_end = time.perf_counter()

    def __enter__(self) -> _VisionClock:
        method = self.handle.method
        original = method.reduce
        self._shadowed = vars(method).get("reduce")

        def timed_reduce(inputs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            result = original(inputs)
            synchronize(self.device)
            self.reduce += time.perf_counter() - start
            return result

        method.reduce = timed_reduce
        projector = self.handle.model.model.multi_modal_projector
        self._hook = projector.register_forward_hook(self._projector_done)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        method = self.handle.method
        if self._shadowed is None:
            del method.reduce
        else:
            method.reduce = self._shadowed


def prepare_inputs(model: Any, processor: Any, images: list[Any], prompts: list[str]) -> dict:
    """Processor outputs for a batch of (image, prompt) pairs, left-padded, on the model's device."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    return {k: v.to(model.device) for k, v in inputs.items()}


def timed_generate(
    model: Any,
    processor: Any,
    handle: Any,
    inputs: dict,
    *,
    max_new_tokens: int = 16,
    force_new_tokens: bool = False,
) -> tuple[Timing, list[str]]:
    """One greedy generate call with the patched model, timed stage by stage.

    Args:
        model: the model ``handle`` patches.
        processor: its processor (for the pad token and decoding).
        handle: the ``prumerge.apply`` handle.
        inputs: from ``prepare_inputs``.
        max_new_tokens: tokens to generate at most.
        force_new_tokens: generate exactly ``max_new_tokens`` (end-of-sequence suppressed until
            then), so that decode timings compare equal amounts of work.

    Returns:
        ``(timing, texts)``.
    """
    from transformers import LogitsProcessorList

    tokenizer = processor.tokenizer
    clock = _FirstTokenClock()
    extra = {"min_new_tokens": max_new_tokens} if force_new_tokens else {}
    synchronize(model.device)
    start = time.perf_counter()
    with _VisionClock(handle) as vision_clock, torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )
    synchronize(model.device)
    end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1] :]
    texts = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    first = clock.first or end
    if vision_clock.projector_end is not None:
        vision = vision_clock.projector_end - start
    else:
        vision = handle.stats.vision_seconds
    timing = Timing(
        vision=vision,
        prefill=max(first - start - vision, 0.0),
        generate=end - first,
        new_tokens=int((new != tokenizer.pad_token_id).sum()),
        reduce=vision_clock.reduce,
        steps=int(new.shape[1]),
        rows=int(new.shape[0]),
    )
    return timing, texts


def generate_answers(
    model: Any,
    processor: Any,
    handle: Any,
    images: list[Any],
    prompts: list[str],
    *,
    max_new_tokens: int = 16,
    repeats: int = 1,
    warmup: int | None = None,
    force_new_tokens: bool = False,
) -> Answer:
    """Greedy answers for a batch of (image, prompt) pairs with the patched model, timed.

    With ``repeats > 1`` the first run is a warm-up (or ``warmup`` runs, when given) and the
    reported timing is the median of the remaining runs.
    """
    inputs = prepare_inputs(model, processor, images, prompts)
    if warmup is None:
        warmup = 1 if repeats > 1 else 0
    runs = []
    texts: list[str] = []
    for _ in range(repeats + warmup):
        timing, texts = timed_generate(
            model,
            processor,
            handle,
            inputs,
            max_new_tokens=max_new_tokens,
            force_new_tokens=force_new_tokens,
        )
        runs.append(timing)
    measured = runs[warmup:] or runs
    median = Timing(
        vision=statistics.median(t.vision for t in measured),
        prefill=statistics.median(t.prefill for t in measured),
        generate=statistics.median(t.generate for t in measured),
        new_tokens=measured[0].new_tokens,
        reduce=statistics.median(t.reduce for t in measured),
        steps=measured[0].steps,
        rows=measured[0].rows,
    )
    return Answer(
        texts=texts,
        tokens_in=list(handle.stats.tokens_in),
        tokens_out=list(handle.stats.tokens_out),
        timing=median,
        timings=measured,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
