"""Loading a model for the CLI and eval, and running one timed generation.

Budgets, method options and the method spec are ``prumerge.methods.spec``'s.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prumerge.errors import PrumergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: ``--dtype`` values, by the names users write.
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",  # the checkpoint's own dtype
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: ``--device-map`` strategies accelerate knows, besides a device name or a JSON object.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


# ---------------------------------------------------------------------------------------------
# Devices, dtypes and device maps
# ---------------------------------------------------------------------------------------------


def resolve_device(text: str | None, *, flag: str = "--device", local_rank: int = 0) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``/None (this process's GPU if any, else CPU).

    Raises:
        PrumergeError: an unknown device, CUDA asked for where there is none, or a GPU
            index this machine does not have.
    """
    if text is None or text.strip().lower() in ("", "auto"):
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    text = text.strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise PrumergeError(f"{flag}: unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PrumergeError(f"{flag} {text!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrumergeError(f"{flag} {text}: CUDA is not available here")
        if device.index is None:
            return f"cuda:{local_rank}"
        if device.index >= torch.cuda.device_count():
            raise PrumergeError(
                f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return str(device)


def resolve_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """The dtype to load with: a name from ``DTYPES``, or the default for ``device``.

    The default is float32 on the CPU and, on CUDA, bfloat16 where the GPU supports it, else
    float16: a 7B model then loads in about 14 GB instead of 28.

    Raises:
        PrumergeError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None:
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise PrumergeError(
            f"--dtype: unknown dtype {name!r}; use float32, float16, bfloat16 or auto"
        )
    return DTYPES[key]


def parse_device_map(text: str | dict | None) -> str | dict[str, Any] | None:
    """``--device-map``: accelerate's strategies (auto, balanced, balanced_low_0, sequential),
    one device (cpu, cuda:1) or a JSON object from module names to devices.

    Raises:
        PrumergeError: anything else, or a device that is not there.
    """
    if text is None or isinstance(text, dict):
        return text
    value = text.strip()
    if value in DEVICE_MAP_STRATEGIES:
        return value
    if value.startswith("{"):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as exc:
            raise PrumergeError(f"--device-map: not a JSON object ({exc.msg})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise PrumergeError("--device-map: the JSON must map module names to devices")
        for device in mapping.values():
            if isinstance(device, str):
                if device not in ("cpu", "disk"):
                    resolve_device(device, flag="--device-map")
            elif not isinstance(device, int) or isinstance(device, bool) or device < 0:
                raise PrumergeError(f"--device-map: {device!r} is not a device")
            else:  # accelerate reads a number as a GPU's index
                resolve_device(f"cuda:{device}", flag="--device-map")
        return mapping
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise PrumergeError(
            f"--device-map: {value!r} is not {', '.join(DEVICE_MAP_STRATEGIES)}, a device or "
            "a JSON object"
        ) from None
    return resolve_device(value, flag="--device-map")


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embeddings' device (the first of a device map)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return model.device


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


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
    device: str | None = "cpu",
    cache_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
):
    """``(model, processor, prompt_fn)`` for the default model (None, ``"default"`` or
    ``"default:base"``) or an HF id/directory.

    ``prompt_fn(question)`` formats one question about one image with the model's template.

    Args:
        model: HF LLaVA id or directory; None, ``"default"`` or ``"default:VARIANT"`` for
            the embedded default model.
        device: where to put the model (``auto``/None: this process's GPU if any, else CPU).
            Ignored with ``device_map``.
        cache_dir: the default model's cache root.
        dtype: a torch dtype or its name (see ``DTYPES``); None: float32 on the CPU,
            bfloat16 (or float16) on CUDA. Both are given to ``from_pretrained``, so weights
            load in that precision and are never held in float32 first.
        device_map: given to ``from_pretrained`` (accelerate places the modules and hooks
            them); see ``parse_device_map``.

    Raises:
        PrumergeError: a path that does not exist, a checkpoint that does not load, or a
            model cache that cannot be used.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    variant = default_variant(model)
    device_map = parse_device_map(device_map)
    if device_map is None:
        device = resolve_device(device)
        placed_on = device
    else:
        placed_on = _map_device(device_map)
    torch_dtype = resolve_dtype(dtype, placed_on)
    if variant is not None:
        from prumerge.models.cache import CacheError, describe_cache_root
        from prumerge.models.default import format_prompt, load_default_model

        try:
            loaded, processor = load_default_model(
                cache_dir=cache_dir,
                device=device,
                dtype=torch_dtype,
                device_map=device_map,
                variant=variant,
            )
        except CacheError as exc:
            raise PrumergeError(f"{exc} ({describe_cache_root(cache_dir)})") from None
        return loaded, processor, lambda question: format_prompt(processor, question)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(model).expanduser()
    if not path.exists() and not _HUB_ID.match(model):
        raise PrumergeError(f"model path does not exist: {model}")
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded = LlavaForConditionalGeneration.from_pretrained(
            str(path) if path.exists() else model, **kwargs
        )
        processor = AutoProcessor.from_pretrained(str(path) if path.exists() else model)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "directory" if path.exists() else "hub id (is the network reachable?)"
        raise PrumergeError(f"cannot load model from {where} {model!r}: {first}") from None
    if device_map is None:
        loaded = loaded.to(device)
    loaded = loaded.eval()

    def prompt(question: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return f"USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's format

    return loaded, processor, prompt


def _map_device(device_map: str | dict[str, Any]) -> str:
    """The device a device map mostly puts weights on, for choosing the default dtype."""
    if isinstance(device_map, dict):
        devices = [str(d) for d in device_map.values()]
        gpu = [d for d in devices if d not in ("cpu", "disk")]
        return "cuda" if gpu else "cpu"
    if device_map in DEVICE_MAP_STRATEGIES:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_map


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
    device = model_device(model)
    return {k: v.to(device) for k, v in inputs.items()}


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
