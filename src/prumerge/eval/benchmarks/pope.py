"""POPE on COCO val2014: the random, popular and adversarial splits."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prumerge.data.sample import SHORT_ANSWER, Sample
from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks.base import register_benchmark
from prumerge.eval.benchmarks.files import (
    ImageChecker,
    find_image_dir,
    read_jsonl,
    resolve_file,
    str_field,
    with_instruction,
)

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")


@register_benchmark(
    "pope",
    metric="pope",
    description="POPE on COCO val2014: random, popular and adversarial splits",
)
def _load_pope(
    root: Path,
    *,
    splits: Iterable[str] = POPE_SPLITS,
    annotation_dir: str = "coco",
    image_dir: str = "val2014",
    check_images: bool = True,
) -> Iterator[Sample]:
    """POPE.

    Layout (LLaVA's ``playground/data/eval/pope``)::

        root/coco/coco_pope_random.json        annotation_dir, one file per split,
        root/coco/coco_pope_popular.json       JSON lines: question_id, image, text, label
        root/coco/coco_pope_adversarial.json
        root/val2014/COCO_val2014_*.jpg        image_dir

    Prompts get LLaVA's short-answer instruction (LLaVA's ``llava_pope_test.jsonl`` is these
    questions with it appended). Sample ids are ``<split>-<question_id>``; the subtask is the
    split.

    Options:
        splits: Which splits, in this order (default all three).
        annotation_dir, image_dir: Paths, relative to ``root`` or absolute.
        check_images: Check that every referenced image exists (default True).
    """
    name = "pope"
    splits = list(splits)
    unknown = sorted(set(splits) - set(POPE_SPLITS))
    if unknown:
        raise PrumergeError(f"{name}: unknown splits {unknown}; choose from {list(POPE_SPLITS)}")
    images = find_image_dir(root, image_dir, name, check_images)
    check = ImageChecker(name, check_images)
    for split in splits:
        path = resolve_file(root, Path(annotation_dir) / f"coco_pope_{split}.json", "file", name)
        for number, item in read_jsonl(path, name):
            where = f"{path} line {number}"
            label = str_field(item, "label", where, name).strip().lower()
            if label not in ("yes", "no"):
                raise PrumergeError(f"{name}: {where}: label should be yes or no, got {label!r}")
            text = str_field(item, "text", where, name)
            yield Sample(
                id=f"{split}-{str_field(item, 'question_id', where, name)}",
                image=check(images / str_field(item, "image", where, name), where),
                prompt=with_instruction(text, SHORT_ANSWER),
                answers=(label,),
                task=name,
                subtask=split,
                meta={"question": text},
            )
