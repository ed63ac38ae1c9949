"""VQAv2, from LLaVA's question JSON lines or the official question JSON."""

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
    read_json,
    read_jsonl,
    resolve_file,
    str_field,
    with_instruction,
)


@register_benchmark(
    "vqav2",
    metric="vqa_accuracy",
    description="VQAv2 (LLaVA question jsonl or official question json; official annotations)",
)
def _load_vqav2(
    root: Path,
    *,
    question_file: str = "llava_vqav2_mscoco_test-dev2015.jsonl",
    annotation_file: str | None = None,
    image_dir: str = "test2015",
    check_images: bool = True,
) -> Iterator[Sample]:
    """VQAv2.

    Layout (LLaVA's ``playground/data/eval/vqav2``)::

        root/llava_vqav2_mscoco_test-dev2015.jsonl   question_file
        root/test2015/COCO_test2015_*.jpg            image_dir
        root/v2_mscoco_val2014_annotations.json      annotation_file (optional)

    The question file is either LLaVA's JSON lines (``question_id``, ``image``, ``text``; the
    text is the prompt, used as is) or the official ``{"questions": [...]}`` JSON
    (``question_id``, ``image_id``, ``question``; images named
    ``COCO_<image_dir>_<image_id:012d>.jpg``, prompts get LLaVA's short-answer instruction).
    The annotation file is the official ``{"annotations": [...]}`` JSON with 10 answers per
    question; test-dev has none public, so without it samples have no answers and are not
    scored. With annotations, a question that has none is an error, and the subtask is the
    answer type ("yes/no", "number", "other").

    Options:
        question_file, annotation_file, image_dir: Paths, relative to ``root`` or absolute.
        check_images: Check that every referenced image exists (default True).
    """
    name = "vqav2"
    questions_path = resolve_file(root, question_file, "question file", name)
    annotations: dict[str, tuple[tuple[str, ...], str | None]] = {}
    if annotation_file is not None:
        annotation_path = resolve_file(root, annotation_file, "annotation file", name)
        payload = read_json(annotation_path, name)
        if not isinstance(payload, dict) or not isinstance(payload.get("annotations"), list):
            raise PrumergeError(f"{name}: {annotation_path}: expected {{'annotations': [...]}}")
        for k, item in enumerate(payload["annotations"]):
            where = f"{annotation_path} annotation {k}"
            qid = str_field(item, "question_id", where, name)
            annotations[qid] = (answer_strings(item, where, name), item.get("answer_type"))
    images = find_image_dir(root, image_dir, name, check_images)
    check = ImageChecker(name, check_images)

    def rows() -> Iterator[tuple[str, str, str, str, str | None]]:
        """Yield (where, question id, image file, prompt, category) per question."""
        if questions_path.suffix == ".jsonl":
            for number, item in read_jsonl(questions_path, name):
                where = f"{questions_path} line {number}"
                yield (
                    where,
                    str_field(item, "question_id", where, name),
                    str_field(item, "image", where, name),
                    str_field(item, "text", where, name),
                    item.get("category"),
                )
            return
        payload = read_json(questions_path, name)
        if not isinstance(payload, dict) or not isinstance(payload.get("questions"), list):
            raise PrumergeError(
                f"{name}: {questions_path}: expected JSON lines (.jsonl) or {{'questions': [...]}}"
            )
        prefix = f"COCO_{Path(image_dir).name}_"
        for k, item in enumerate(payload["questions"]):
            where = f"{questions_path} question {k}"
            image_id = int(str_field(item, "image_id", where, name))
            question = str_field(item, "question", where, name)
            yield (
                where,
                str_field(item, "question_id", where, name),
                f"{prefix}{image_id:012d}.jpg",
                with_instruction(question, SHORT_ANSWER),
                None,
            )

    for where, qid, image, prompt, category in rows():
        answers: tuple[str, ...] = ()
        subtask = category
        if annotations:
            if qid not in annotations:
                raise PrumergeError(f"{name}: {where}: question {qid} has no annotation")
            answers, subtask = annotations[qid]
        yield Sample(
            id=qid,
            image=check(images / image, where),
            prompt=prompt,
            answers=answers,
            task=name,
            subtask=subtask,
            meta={"question": prompt.split("\n")[0]},
        )
