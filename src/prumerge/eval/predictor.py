"""A :class:`~prumerge.eval.runner.Predictor` for a loaded LLaVA model and one reduction method.

:class:`ModelPredictor` patches the model with :func:`prumerge.apply` when it is built and
undoes the patch on :meth:`~ModelPredictor.close` (or at the end of a ``with`` block), so one
predictor is one configuration. Samples are answered in batches through
:func:`prumerge.generation.generate_answers` (left-padded, greedy), and each answer carries the
visual tokens its image produced and the number the language model received.

The lmms-eval plugin (:mod:`prumerge.eval.lmms_plugin`) answers its requests through the same
:meth:`ModelPredictor.generate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prumerge.errors import PrumergeError
from prumerge.eval.datasets import Sample
from prumerge.eval.runner import Prediction

__all__ = [
    "MAX_NEW_TOKENS",
    "Generation",
    "ModelPredictor",
    "chat_prompt",
    "max_new_tokens_for",
]

#: Generation length cap per metric. Every benchmark here asks for a single word, phrase or
#: option letter (LLaVA-1.5's answer instructions), and greedy decoding stops at the end of
#: turn, so the cap only bounds a model that rambles. TextVQA answers are the longest
#: (brand names, numbers with units).
MAX_NEW_TOKENS: dict[str, int] = {
    "exact_match": 8,
    "pope": 8,
    "mme": 8,
    "sqa_letter": 8,
    "vqa_accuracy": 16,
}


def max_new_tokens_for(metric: str) -> int:
    """The generation cap for a benchmark's metric (16 for metrics not listed)."""
    return MAX_NEW_TOKENS.get(metric, 16)


def chat_prompt(processor: Any, question: str, num_images: int) -> str:
    """A user turn with ``num_images`` images before the question, in the model's template.

    Used where a request does not hold exactly one image (lmms-eval tasks may hold none or
    several); a sample with one image uses the model's own prompt function instead.

    Args:
        processor: The model's processor; its chat template is used when it has one.
        question: The text of the turn.
        num_images: Images placed before the text.

    Returns:
        The prompt, ending where the assistant's answer begins. Without a chat template it is
        LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:`` format.
    """
    if getattr(processor, "chat_template", None):
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    token = getattr(processor, "image_token", "<image>")
    images = "".join(f"{token}\n" for _ in range(num_images))
    return f"USER: {images}{question} ASSISTANT:"


@dataclass(frozen=True)
class Generation:
    """One answer from :meth:`ModelPredictor.generate`.

    Attributes:
        text: The decoded answer, stripped.
        tokens_in: Visual tokens the prompt's images produced (summed over its images).
        tokens_out: Visual tokens the language model received for them (LLM-side methods:
            from their last pruning stage on).
        equivalent_tokens: The same, averaged over the LLM's layers (the "equivalent
            tokens" LLM-side papers report; ``tokens_out`` for vision-side methods).
    """

    text: str
    tokens_in: int
    tokens_out: int
    equivalent_tokens: float | None = None


class ModelPredictor:
    """Answers benchmark samples with a LLaVA model patched by one reduction method.

    Building the predictor patches ``model`` (one :func:`prumerge.apply` handle); ``close()``
    restores it, so build the next configuration's predictor only after closing this one. It
    is a context manager.

    Args:
        model: A ``LlavaForConditionalGeneration`` (see :func:`prumerge.apply`).
        processor: Its processor.
        prompt_fn: Formats one question about one image with the model's template (the third
            value :func:`prumerge.loading.load_model` returns).
        method: A registered method name or a ``VisionMethod`` instance.
        max_new_tokens: Generation cap per answer.
        **options: The method's options when ``method`` is a name (``keep=0.25``, ...).

    Raises:
        PrumergeError: Unknown method or option, or a model the adapter does not support.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        prompt_fn: Callable[[str], str],
        method: Any = "none",
        *,
        max_new_tokens: int = 8,
        **options: Any,
    ) -> None:
        import prumerge
        from prumerge.methods import build_method

        if max_new_tokens < 1:
            raise PrumergeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if isinstance(method, str):
            try:
                method = build_method(method, **options)
            except (ValueError, TypeError) as exc:
                raise PrumergeError(str(exc)) from None
        elif options:
            raise PrumergeError("pass options either to the method instance or here, not both")
        self.model = model
        self.processor = processor
        self.prompt_fn = prompt_fn
        self.method = method
        self.max_new_tokens = max_new_tokens
        self.handle: Any = prumerge.apply(model, method, processor=processor)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Undo the patch (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> ModelPredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- answering -------------------------------------------------------------------------
    def predict(self, samples: Sequence[Sample]) -> list[Prediction]:
        """Answer a batch of samples (one image each), in order; see the runner's protocol.

        With a vision-side method on a family of ``shared_prefix.SHARED_FAMILIES`` (LLaVA-1.5,
        NeXT, OneVision), the samples that share an image share its prompt prefix
        (:mod:`prumerge.shared_prefix`): the vision tower, the reduction and the LLM's pass
        over the image's tokens run once per image, not once per question. The answers are
        those of ``generate``. FastV, whose kept tokens depend on the question, and
        ``positions="original"`` (whose position ids the shared prefix does not build) and
        the other families answer each sample in full.
        """
        if self.handle is None:
            raise PrumergeError("this predictor is closed")
        from prumerge.shared_prefix import can_share

        if can_share(self.handle) and samples:
            return self._predict_shared(samples)
        questions = [self.prompt_fn(sample.prompt) for sample in samples]
        images = [[sample.load_image()] for sample in samples]
        answers = self.generate(questions, images, formatted=True)
        return [
            Prediction(a.text, a.tokens_in, a.tokens_out, equivalent_tokens=a.equivalent_tokens)
            for a in answers
        ]

    def _predict_shared(self, samples: Sequence[Sample]) -> list[Prediction]:
        from prumerge.shared_prefix import answer_shared_prefix

        groups: dict[Any, list[int]] = {}
        for index, sample in enumerate(samples):
            source = sample.image
            # A file (a path, or the loaders' ImageFile, one object per sample) is one image
            # by its path; an image in memory by its identity.
            key = os.fspath(source) if isinstance(source, (str, os.PathLike)) else id(source)
            groups.setdefault(key, []).append(index)
        order = list(groups.values())
        images = [samples[members[0]].load_image() for members in order]
        answers = answer_shared_prefix(
            self.model,
            self.processor,
            self.handle,
            images,
            [[samples[i].prompt for i in members] for members in order],
            self.prompt_fn,
            max_new_tokens=self.max_new_tokens,
        )
        stats = self.handle.stats
        tokens_in, tokens_out = stats.tokens_in, stats.tokens_out
        equivalent = stats.equivalent_tokens
        out: list[Prediction | None] = [None] * len(samples)
        for g, members in enumerate(order):
            for i, text in zip(members, answers[g], strict=True):
                out[i] = Prediction(
                    text, int(tokens_in[g]), int(tokens_out[g]), equivalent_tokens=equivalent[g]
                )
        return [p for p in out if p is not None]

    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[Any]],
        *,
        max_new_tokens: int | None = None,
        formatted: bool = False,
        stop: Sequence[str] = (),
    ) -> list[Generation]:
        """Greedy answers for a batch of questions, each with zero or more images.

        Args:
            questions: One text per answer.
            images: The PIL images of each question (same length as ``questions``).
            max_new_tokens: Cap for this call; default the predictor's.
            formatted: The questions are already full prompts with image placeholders.
                Otherwise a question with one image is formatted by ``prompt_fn`` and any
                other by :func:`chat_prompt`.
            stop: Cut each answer before the first occurrence of any of these strings
                (lmms-eval's ``until``).

        Returns:
            One :class:`Generation` per question, in order.
        """
        from prumerge.generation import generate_answers

        if self.handle is None:
            raise PrumergeError("this predictor is closed")
        if len(questions) != len(images):
            raise PrumergeError(f"{len(questions)} questions but {len(images)} image lists")
        if not questions:
            return []
        counts = [len(row) for row in images]
        if formatted:
            prompts = list(questions)
        else:
            prompts = [
                self.prompt_fn(q) if n == 1 else chat_prompt(self.processor, q, n)
                for q, n in zip(questions, counts, strict=True)
            ]
        flat = [image for row in images for image in row]
        answer = generate_answers(
            self.model,
            self.processor,
            self.handle,
            flat if flat else None,  # type: ignore[arg-type]  # text-only batch
            prompts,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
        )
        # handle.stats is per image of this call, in the order the processor saw the images
        # (prompt by prompt); a text-only call leaves the previous call's stats behind.
        per_image_in = answer.tokens_in if flat else []
        per_image_out = answer.tokens_out if flat else []
        per_image_equivalent = answer.equivalent_tokens if flat else []
        if len(per_image_in) != len(flat) or len(per_image_out) != len(flat):
            raise PrumergeError(
                f"the model reported token counts for {len(per_image_in)} images, "
                f"expected {len(flat)}"
            )
        out = []
        start = 0
        for text, n in zip(answer.texts, counts, strict=True):
            out.append(
                Generation(
                    text=_cut(text, stop),
                    tokens_in=int(sum(per_image_in[start : start + n])),
                    tokens_out=int(sum(per_image_out[start : start + n])),
                    equivalent_tokens=float(sum(per_image_equivalent[start : start + n]))
                    if len(per_image_equivalent) == len(flat)
                    else None,
                )
            )
            start += n
        return out

    def score_continuation(
        self, question: str, continuation: str, images: Sequence[Any]
    ) -> tuple[float, bool]:
        """Log-probability of ``continuation`` after the prompt for ``question``, with reduction.

        The prompt is formatted as in :meth:`generate`; prompt and continuation are tokenised
        together and the continuation is what the joint sequence adds to the prompt's tokens
        (the convention of lmms-eval's HF models). Reduction only shortens the image runs
        inside the prompt, so the continuation stays the last tokens of the sequence.

        Returns:
            ``(sum of the continuation's token log-probabilities, whether greedy decoding
            would produce exactly those tokens)``.
        """
        import torch

        if self.handle is None:
            raise PrumergeError("this predictor is closed")
        n = len(images)
        prompt = self.prompt_fn(question) if n == 1 else chat_prompt(self.processor, question, n)
        pictures = list(images) if images else None
        full = self.processor(images=pictures, text=[prompt + continuation], return_tensors="pt")
        alone = self.processor(images=pictures, text=[prompt], return_tensors="pt")
        length = full["input_ids"].shape[1] - alone["input_ids"].shape[1]
        if length <= 0:
            raise PrumergeError(f"the continuation {continuation!r} adds no tokens")
        inputs = {k: v.to(self.model.device) for k, v in full.items()}
        with torch.inference_mode():
            logits = self.model(**inputs).logits  # (1, L', V), L' after reduction
        target = inputs["input_ids"][0, -length:]  # (length,)
        log_probs = torch.log_softmax(logits[0, -length - 1 : -1].float(), dim=-1)
        total = float(log_probs.gather(-1, target[:, None]).sum())
        greedy = bool((log_probs.argmax(dim=-1) == target).all())
        return total, greedy


def _cut(text: str, stop: Sequence[str]) -> str:
    for marker in stop:
        if marker:
            text = text.split(marker, 1)[0]
    return text.strip()
