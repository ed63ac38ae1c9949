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


def load_model(model: str | None, *, device: str = "cpu", cache_dir: str | None = None):
    """``(model, processor, prompt_fn)`` for the default model (None) or an HF id/directory.

    ``prompt_fn(question)`` formats one question about one image with the model's template.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model is None:
        from prumerge.models.default import format_prompt, load_default_model

        loaded, processor = load_default_model(cache_dir=cache_dir, device=device)
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


@dataclass
class Timing:
    """Seconds spent in one generate call, split at the first token."""

    vision: float = 0.0
    prefill: float = 0.0
    generate: float = 0.0
    new_tokens: int = 0

    @property
    def total(self) -> float:
        return self.vision + self.prefill + self.generate


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
    prompt phase from the decoding phase without running anything twice.
    """

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def generate_answers(
    model: Any,
    processor: Any,
    handle: Any,
    images: list[Any],
    prompts: list[str],
    *,
    max_new_tokens: int = 16,
    repeats: int = 1,
) -> Answer:
    """Greedy answers for a batch of (image, prompt) pairs with the patched model, timed.

    With ``repeats > 1`` the first run is a warm-up and the reported timing is the median of
    the remaining runs.
    """
    from transformers import LogitsProcessorList

    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    runs = []
    texts: list[str] = []
    for _ in range(repeats + (1 if repeats > 1 else 0)):
        clock = _FirstTokenClock()
        synchronize(model.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=tokenizer.pad_token_id,
            )
        synchronize(model.device)
        end = time.perf_counter()
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
        first = clock.first or end
        vision = handle.stats.vision_seconds
        runs.append(
            Timing(
                vision=vision,
                prefill=max(first - start - vision, 0.0),
                generate=end - first,
                new_tokens=int((new != tokenizer.pad_token_id).sum()),
            )
        )
    measured = runs[1:] if len(runs) > 1 else runs
    median = Timing(
        vision=statistics.median(t.vision for t in measured),
        prefill=statistics.median(t.prefill for t in measured),
        generate=statistics.median(t.generate for t in measured),
        new_tokens=measured[0].new_tokens,
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
