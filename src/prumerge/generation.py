"""One timed generation: greedy answers for a batch of (image, prompt) pairs, split into
vision (tower, reduction, projector), prefill and decode times read off the adapter's parts."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prumerge.errors import PrumergeError
from prumerge.loading.devices import model_device


def check_prompt_length(model: Any, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """Refuse a prompt that, with the tokens to generate, exceeds the LLM's positions.

    The check is on the unreduced prompt (every visual placeholder), the longest it can be.
    """
    config = getattr(model.config, "text_config", model.config)
    limit = getattr(config, "max_position_embeddings", None)
    length = int(input_ids.shape[-1])
    if isinstance(limit, int) and length + max_new_tokens > limit:
        raise PrumergeError(
            f"the prompt is {length} tokens (visual placeholders included) and "
            f"{max_new_tokens} are to be generated, but the language model takes at most "
            f"{limit} positions; shorten the question or lower --max-new-tokens"
        )


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
    #: per image, its tokens averaged over the LLM's layers (``TokenStats.equivalent_tokens``)
    equivalent_tokens: list[float] = field(default_factory=list)


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
    """Times the method's ``reduce`` and the end of the vision stage in one patched call.

    The vision stage ends when the family's adapter has encoded every image (tower,
    reduction and projector, as that adapter runs them): a wrapper around this handle's
    ``adapter.encode``. Where a call does not go through it, the handle's projector (the
    adapter's: LLaVA's MLP, Qwen's merger...) marks the end with a forward hook. A wrapper
    around this one method instance's ``reduce`` times the method alone. Each wrapper is an
    instance attribute shadowing the class's method, removed on exit, and each reading
    synchronises CUDA first, so the split is correct with asynchronous kernels.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.device = model_device(handle.model)
        self.reduce = 0.0
        self.projector_end: float | None = None
        self.encode_end: float | None = None
        self._hook: Any = None
        self._shadowed: list[tuple[Any, str, Any]] = []

    @property
    def vision_end(self) -> float | None:
        return self.encode_end if self.encode_end is not None else self.projector_end

    def _projector_done(self, _module: Any, _inputs: Any, _output: Any) -> None:
        synchronize(self.device)
        self.projector_end = time.perf_counter()

    def _shadow(self, owner: Any, name: str, wrapper: Any) -> None:
        self._shadowed.append((owner, name, vars(owner).get(name)))
        setattr(owner, name, wrapper)

    def __enter__(self) -> _VisionClock:
        method = self.handle.method
        reduce = method.reduce

        def timed_reduce(inputs: Any) -> Any:
            synchronize(self.device)
            start = time.perf_counter()
            result = reduce(inputs)
            synchronize(self.device)
            self.reduce += time.perf_counter() - start
            return result

        self._shadow(method, "reduce", timed_reduce)
        adapter = getattr(self.handle, "adapter", None)
        if adapter is not None:
            encode = adapter.encode

            def timed_encode(images: Any) -> Any:
                result = encode(images)
                synchronize(self.device)
                self.encode_end = time.perf_counter()
                return result

            self._shadow(adapter, "encode", timed_encode)
        self._hook = self.handle.projector.register_forward_hook(self._projector_done)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()
        for owner, name, before in reversed(self._shadowed):
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
        self._shadowed.clear()


def prepare_inputs(model: Any, processor: Any, images: list[Any], prompts: list[str]) -> dict:
    """Processor outputs for a batch of (image, prompt) pairs, left-padded, on the model's device."""
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=_per_prompt(processor, images, prompts),
        text=prompts,
        padding=True,
        return_tensors="pt",
    )
    device = model_device(model)
    return {k: v.to(device) for k, v in inputs.items()}


def _per_prompt(processor: Any, images: list[Any] | None, prompts: list[str]) -> Any:
    """The images as one list per prompt (the batched form every processor takes, and the
    only one Gemma 3's does), split by the image tokens in each prompt; as given when the
    counts do not add up (or there are no images)."""
    token = getattr(processor, "image_token", None)
    if not images or not isinstance(token, str) or not token:
        return images
    counts = [prompt.count(token) for prompt in prompts]
    if sum(counts) != len(images):
        return images
    nested, start = [], 0
    for count in counts:
        nested.append(list(images[start : start + count]))
        start += count
    return nested


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
    device = model_device(model)
    synchronize(device)
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
    synchronize(device)
    end = time.perf_counter()
    new = out[:, inputs["input_ids"].shape[1] :]
    texts = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    first = clock.first or end
    if vision_clock.vision_end is not None:
        vision = vision_clock.vision_end - start
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
        equivalent_tokens=list(handle.stats.equivalent_tokens),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
