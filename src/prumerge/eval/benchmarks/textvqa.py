"""TextVQA (validation), prompted with OCR tokens as LLaVA-1.5 is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prumerge.data.sample import SHORT_ANSWER, Sample
from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks.base import register_benchmark
from prumerge.eval.benchmarks.files import (
    ImageChecker,
    answer_strings,
    find_image_dir,
    get_field,
    read_json,
    read_jsonl,
    resolve_file,
    str_field,
)


def textvqa_question(prompt: str) -> str:
    """The bare question inside a LLaVA TextVQA prompt, lowercased, as LLaVA's evaluator
    finds it: the line that is not the OCR line, or the first line."""
    lines = prompt.split("\n")
    if prompt.startswith("Reference OCR token:") and len(lines) > 1:
        return lines[1].lower()
    return lines[0].lower()


@register_benchmark(
    "textvqa",
    metric="vqa_accuracy",
    description="TextVQA val with LLaVA's OCR-token prompt",
)
def _load_textvqa(
    root: Path,
    *,
    question_file: str | None = "llava_textvqa_val_v051_ocr.jsonl",
    annotation_file: str = "TextVQA_0.5.1_val.json",
    image_dir: str = "train_images",
    check_images: bool = True,
) -> Iterator[Sample]:
    """TextVQA (validation), prompted with OCR tokens as LLaVA-1.5 is.

    Layout (LLaVA's ``playground/data/eval/textvqa``)::

        root/llava_textvqa_val_v051_ocr.jsonl   question_file
        root/TextVQA_0.5.1_val.json             annotation_file
        root/train_images/<image_id>.jpg        image_dir

    LLaVA's question file holds the prompt (``text``: the question, a line
    ``Reference OCR token: a, b, c`` and the short-answer instruction); its ``question_id`` is
    the image id. As LLaVA's evaluator does, each line is matched to its annotation by image
    id and lowercased question. With ``question_file=None`` the prompts are built from the
    annotation file instead, which then needs ``ocr_tokens`` per entry: the question, the OCR
    line (when there are tokens) and the instruction.

    Options:
        question_file, annotation_file, image_dir: Paths, relative to ``root`` or absolute.
        check_images: Check that every referenced image exists (default True).
    """
    name = "textvqa"
    annotation_path = resolve_file(root, annotation_file, "annotation file", name)
    payload = read_json(annotation_path, name)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise PrumergeError(f"{name}: {annotation_path}: expected {{'data': [...]}}")
    images = find_image_dir(root, image_dir, name, check_images)
    check = ImageChecker(name, check_images)

    entries = []
    for k, item in enumerate(payload["data"]):
        where = f"{annotation_path} entry {k}"
        entries.append(
            (
                where,
                str_field(item, "question_id", where, name),
                str_field(item, "image_id", where, name),
                str_field(item, "question", where, name),
                answer_strings(item, where, name),
                item,
            )
        )

    if question_file is None:
        for where, qid, image_id, question, answers, item in entries:
            tokens = get_field(item, "ocr_tokens", where, name)
            prompt = question
            if tokens:
                prompt += "\nReference OCR token: " + ", ".join(str(t) for t in tokens)
            yield Sample(
                id=qid,
                image=check(images / f"{image_id}.jpg", where),
                prompt=prompt + SHORT_ANSWER,
                answers=answers,
                task=name,
                meta={"question": question, "image_id": image_id},
            )
        return

    by_key = {
        (image_id, question.lower()): (qid, answers)
        for _, qid, image_id, question, answers, _ in entries
    }
    questions_path = resolve_file(root, question_file, "question file", name)
    for number, item in read_jsonl(questions_path, name):
        where = f"{questions_path} line {number}"
        image_id = str_field(item, "question_id", where, name)
        prompt = str_field(item, "text", where, name)
        key = (image_id, textvqa_question(prompt))
        if key not in by_key:
            raise PrumergeError(
                f"{name}: {where}: no annotation in {annotation_path} for image {image_id} and "
                f"question {key[1]!r}"
            )
        qid, answers = by_key[key]
        image = item.get("image") or f"{image_id}.jpg"
        yield Sample(
            id=qid,
            image=check(images / str(image), where),
            prompt=prompt,
            answers=answers,
            task=name,
            meta={"question": key[1], "image_id": image_id},
        )
