"""Measuring: configurations timed round-robin on the same batches, with their peak memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prumerge.methods.spec import MethodSpec


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
                with prumerge.apply(model, methods[config.label], processor=processor) as handle:
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
