"""Built-in benchmarks that need no data directory: generated scenes and easy-vqa."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prumerge.data.easy_vqa import easy_vqa_split, question_type
from prumerge.data.sample import SHORT_ANSWER, Sample
from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks.base import register_benchmark


@register_benchmark(
    "synth",
    metric="exact_match",
    description="generated scenes of small coloured shapes (existence, colour, shape, count, "
    "relation)",
    needs_root=False,
)
def _load_synth(
    root: Path | None,
    *,
    n_scenes: int = 100,
    split: str = "test",
    seed: int = 0,
    photo_patches: bool = False,
    question_types: list[str] | None = None,
) -> Iterator[Sample]:
    """The generated benchmark (see :mod:`prumerge.data.synth`).

    Options:
        n_scenes: Number of scenes (10-11 questions each).
        split: "test" (default) or "train".
        seed: Benchmark seed.
        photo_patches: Add scikit-image photo patches as extra objects.
        question_types: Keep only these question types.
    """
    from prumerge.data import synth

    config = synth.SynthConfig(photo_patches=photo_patches)
    try:
        yield from synth.iter_samples(
            n_scenes, split=split, seed=seed, config=config, question_types=question_types
        )
    except ValueError as exc:
        raise PrumergeError(f"synth: {exc}") from None


@register_benchmark(
    "easy-vqa",
    metric="exact_match",
    description="easy-vqa: 64x64 images of one coloured shape (installed package)",
    needs_root=False,
)
def _load_easy_vqa(root: Path | None, *, split: str = "test") -> Iterator[Sample]:
    """easy-vqa, from the installed ``easy-vqa`` package.

    Subtasks: "yes/no", "shape" or "color", from the answer.

    Options:
        split: "test" (default, 9,673 questions) or "train" (38,575).
    """
    questions, answers, image_ids, image_paths = easy_vqa_split(split)
    for index, (question, answer, image_id) in enumerate(
        zip(questions, answers, image_ids, strict=True)
    ):
        yield Sample(
            id=f"easy-vqa-{split}-{index}",
            image=image_paths[image_id],
            prompt=question + SHORT_ANSWER,
            answers=(answer,),
            task="easy-vqa",
            subtask=question_type(answer),
            meta={"question": question, "image_id": image_id},
        )
