"""easy-vqa (the installed ``easy-vqa`` package): 64x64 images of one coloured shape.

The one place that reads the package. Its train split (4,000 images, 38,575 questions) trains
the default model; its test split (1,000 images, 9,673 questions) evaluates it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from prumerge.errors import PrumergeError

__all__ = [
    "first_questions_per_type",
    "SHAPES",
    "balanced_keep_rates",
    "easy_vqa_split",
    "is_negated",
    "load_easy_vqa",
    "question_type",
]

SHAPES = frozenset({"circle", "rectangle", "triangle"})


def easy_vqa_split(split: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """easy-vqa's ``(questions, answers, image_ids, image_paths)`` for "train" or "test"."""
    try:
        import easy_vqa
    except ImportError:
        raise PrumergeError(
            "easy-vqa: the easy-vqa package is not installed (pip install easy-vqa==1.0)"
        ) from None
    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        return questions, answers, image_ids, easy_vqa.get_test_image_paths()
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        return questions, answers, image_ids, easy_vqa.get_train_image_paths()
    raise PrumergeError(f"easy-vqa: unknown split {split!r}; choose 'train' or 'test'")


def load_easy_vqa(split: str) -> tuple[list[int], dict[int, list[tuple[str, str]]], dict[int, str]]:
    """easy-vqa questions grouped by image.

    Args:
        split: "train" or "test".

    Returns:
        `(image_ids, turns, paths)`: image ids sorted ascending; for each id its (question,
        answer) pairs in the dataset's order; for each id the PNG path.
    """
    questions, answers, ids, paths = easy_vqa_split(split)
    turns: dict[int, list[tuple[str, str]]] = {}
    for question, answer, image_id in zip(questions, answers, ids, strict=True):
        turns.setdefault(int(image_id), []).append((question, answer))
    return sorted(turns), turns, {int(k): v for k, v in paths.items()}


def question_type(answer: str) -> str:
    """easy-vqa question type from its answer: "yes/no", "shape" or "color"."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    return "color"


_NEGATION = re.compile(r"\b(not|no)\b|n't")


def first_questions_per_type(
    quota: dict[str, int], split: str = "test"
) -> list[tuple[str, str, str]]:
    """A small fixed question set: for the split's images in ascending id order, the first
    question of each type (see ``question_type``) until ``quota`` of each type is reached.

    Returns:
        ``(image path, question, answer)`` triples, in the order they were taken.
    """
    ids, turns, paths = load_easy_vqa(split)
    chosen, need = [], dict(quota)
    for image_id in ids:
        seen = set()
        for question, answer in turns[image_id]:
            kind = question_type(answer)
            if need.get(kind) and kind not in seen:
                chosen.append((paths[image_id], question, answer))
                need[kind] -= 1
                seen.add(kind)
        if not any(need.values()):
            break
    return chosen


def is_negated(question: str) -> bool:
    """Whether an easy-vqa yes/no question is negated ("is there not a circle?")."""
    return _NEGATION.search(question.lower()) is not None


def balanced_keep_rates(
    questions: Sequence[str], answers: Sequence[str]
) -> dict[tuple[bool, str], float]:
    """Keep probability per (negated, answer) cell of yes/no questions that equalises "yes"
    and "no" within plain and within negated questions (the minority answer keeps all)."""
    counts: dict[tuple[bool, str], int] = {}
    for question, answer in zip(questions, answers, strict=True):
        if answer in ("yes", "no"):
            cell = (is_negated(question), answer)
            counts[cell] = counts.get(cell, 0) + 1
    rates = {}
    for negated in (False, True):
        yes, no = counts.get((negated, "yes"), 0), counts.get((negated, "no"), 0)
        least = min(yes, no)
        rates[(negated, "yes")] = least / yes if yes else 1.0
        rates[(negated, "no")] = least / no if no else 1.0
    return rates
