"""One question about one image: the record that benchmarks and training data share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from prumerge.errors import PrumergeError

__all__ = ["OPTION_ANSWER", "SHORT_ANSWER", "ImageSource", "Sample"]

ImageSource = str | Path | Image.Image | Callable[[], Image.Image]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short-answer benchmarks (VQAv2, TextVQA, POPE, MME, GQA)."""

OPTION_ANSWER = "\nAnswer with the option's letter from the given choices directly."
"""LLaVA-1.5's instruction for multiple-choice benchmarks (ScienceQA, MMBench)."""


@dataclass(frozen=True)
class Sample:
    """One evaluation question.

    Attributes:
        id: Unique within its benchmark; the runner keys predictions by it.
        image: A path, a PIL image, or a callable that returns one (lazy, for generated data).
        prompt: The text the model gets with the image: the question and the benchmark's
            answer instruction, without any image placeholder or chat template.
        answers: Reference answers (10 for VQAv2/TextVQA, one otherwise); empty when the
            split has no public answers.
        task: The benchmark's name.
        subtask: Its subdivision, for per-subtask scores: the POPE split, the MME subtask,
            the VQAv2 answer type, the generated benchmark's question type.
        meta: JSON-serialisable extras the metric needs (``image`` for MME's image pairs,
            ``num_choices`` for ScienceQA) or that help reading the results (``question``).
    """

    id: str
    image: ImageSource
    prompt: str
    answers: tuple[str, ...] = ()
    task: str = ""
    subtask: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """The image as an RGB PIL image (opened from disk or drawn, if need be)."""
        source = self.image
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (str, Path)):
            try:
                with Image.open(source) as opened:
                    image = opened.copy()
            except OSError as exc:
                raise PrumergeError(f"cannot read image {source}: {exc}") from exc
        else:
            image = source()
        return image if image.mode == "RGB" else image.convert("RGB")
