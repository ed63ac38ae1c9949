"""ScienceQA-IMG: the test questions that come with an image."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prumerge.data.sample import OPTION_ANSWER, Sample
from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks.base import register_benchmark
from prumerge.eval.benchmarks.files import (
    ImageChecker,
    find_image_dir,
    get_field,
    read_json,
    resolve_file,
    str_field,
)

_OPTION_LETTERS = "ABCDE"


def scienceqa_prompt(problem: Mapping[str, Any]) -> str:
    """A ScienceQA prompt built from a ``problems.json`` entry: the context line (when there
    is a hint), the question, lettered options and LLaVA's option instruction."""
    context = f"Context: {problem['hint']}\n" if problem.get("hint") else ""
    options = "\n".join(
        f"{_OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(problem["choices"])
    )
    return f"{context}{problem['question']}\n{options}{OPTION_ANSWER}"


@register_benchmark(
    "scienceqa-img",
    metric="sqa_letter",
    description="ScienceQA test, questions with an image (IMG subset)",
)
def _load_scienceqa(
    root: Path,
    *,
    question_file: str | None = "llava_test_CQM-A.json",
    problems_file: str = "problems.json",
    splits_file: str = "pid_splits.json",
    split: str = "test",
    image_dir: str = "images/test",
    check_images: bool = True,
) -> Iterator[Sample]:
    """ScienceQA-IMG: the test questions that come with an image.

    Layout (LLaVA's ``playground/data/eval/scienceqa``)::

        root/llava_test_CQM-A.json      question_file (LLaVA's conversations; optional)
        root/problems.json              problems_file: answers and choices
        root/pid_splits.json            splits_file: problem ids per split
        root/images/test/<id>/image.png image_dir

    With LLaVA's question file (when it exists), the prompt is the human turn without the
    ``<image>`` tag, plus LLaVA's option instruction (its ``--single-pred-prompt``). Without
    it (or with ``question_file=None``), prompts are built from ``problems.json`` by
    :func:`scienceqa_prompt`. The reference answer is the option letter; the subtask is the
    subject.

    Options:
        question_file, problems_file, splits_file, image_dir: Paths, relative to ``root`` or
            absolute.
        split: Split in ``pid_splits.json`` (default "test").
        check_images: Check that every referenced image exists (default True).
    """
    name = "scienceqa-img"
    problems_path = resolve_file(root, problems_file, "problems file", name)
    problems = read_json(problems_path, name)
    if not isinstance(problems, dict):
        raise PrumergeError(f"{name}: {problems_path}: expected an object keyed by problem id")
    images = find_image_dir(root, image_dir, name, check_images)
    check = ImageChecker(name, check_images)

    def sample(pid: str, prompt: str, image: Path, where: str) -> Sample:
        if pid not in problems:
            raise PrumergeError(f"{name}: {where}: problem {pid} not in {problems_path}")
        problem = problems[pid]
        where_problem = f"{problems_path} problem {pid}"
        choices = get_field(problem, "choices", where_problem, name)
        answer = get_field(problem, "answer", where_problem, name)
        if not isinstance(answer, int) or not 0 <= answer < len(choices) <= 5:
            raise PrumergeError(f"{name}: {where_problem}: answer index out of range")
        return Sample(
            id=pid,
            image=check(image, where),
            prompt=prompt,
            answers=(_OPTION_LETTERS[answer],),
            task=name,
            subtask=problem.get("subject"),
            meta={"num_choices": len(choices), "question": problem.get("question", "")},
        )

    use_llava = question_file is not None and (
        Path(question_file).is_absolute() or (root / question_file).exists()
    )
    if use_llava:
        assert question_file is not None
        questions_path = resolve_file(root, question_file, "question file", name)
        entries = read_json(questions_path, name)
        if not isinstance(entries, list):
            raise PrumergeError(f"{name}: {questions_path}: expected a list of conversations")
        for k, entry in enumerate(entries):
            where = f"{questions_path} entry {k}"
            if not isinstance(entry, dict):
                raise PrumergeError(f"{name}: {where}: expected an object")
            if "image" not in entry:
                continue  # text-only question: not in the IMG subset
            turns = get_field(entry, "conversations", where, name)
            if not isinstance(turns, list) or not turns or "value" not in turns[0]:
                raise PrumergeError(f"{name}: {where}: malformed 'conversations'")
            text = str(turns[0]["value"]).replace("<image>", "").strip()
            yield sample(
                str_field(entry, "id", where, name),
                text + OPTION_ANSWER,
                images / str_field(entry, "image", where, name),
                where,
            )
        return

    splits_path = resolve_file(root, splits_file, "splits file", name)
    splits = read_json(splits_path, name)
    if not isinstance(splits, dict) or split not in splits:
        raise PrumergeError(f"{name}: {splits_path}: no split {split!r}")
    for pid in splits[split]:
        pid = str(pid)
        where = f"{splits_path} split {split!r} problem {pid}"
        problem = problems.get(pid)
        if problem is None:
            raise PrumergeError(f"{name}: {where}: problem {pid} not in {problems_path}")
        if not problem.get("image"):
            continue
        try:
            prompt = scienceqa_prompt(problem)
        except (KeyError, IndexError, TypeError) as exc:
            raise PrumergeError(
                f"{name}: {problems_path} problem {pid}: malformed ({exc})"
            ) from None
        yield sample(pid, prompt, images / pid / str(problem["image"]), where)
