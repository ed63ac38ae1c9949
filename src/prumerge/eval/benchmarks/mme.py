"""MME, from its release folder: 10 perception and 4 cognition yes/no subtasks."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from prumerge.data.sample import SHORT_ANSWER, Sample
from prumerge.errors import PrumergeError
from prumerge.eval.benchmarks.base import missing_data, register_benchmark
from prumerge.eval.benchmarks.files import (
    with_instruction,
)

_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@register_benchmark(
    "mme",
    metric="mme",
    description="MME: 10 perception and 4 cognition yes/no subtasks",
)
def _load_mme(root: Path, *, subtasks: Iterable[str] | None = None) -> Iterator[Sample]:
    """MME, from its release folder (``MME_Benchmark_release_version``).

    Layout: one folder per subtask (``existence``, ``count``, ..., ``code_reasoning``). A
    folder holds either image files with a ``.txt`` of the same name beside each, or
    ``images/`` and ``questions_answers_YN/`` subfolders with the images and the ``.txt``
    files. Each ``.txt`` has one question per line, ``question<TAB>Yes|No`` (two per image).

    Prompts get LLaVA's short-answer instruction after MME's own "Please answer yes or no.".
    Sample ids are ``<subtask>/<image stem>/<k>``; ``meta["image"]`` pairs the questions of an
    image for acc+.

    Options:
        subtasks: Which subtasks (default: every MME subtask folder present).
    """
    from prumerge.eval.metrics import MME_COGNITION, MME_PERCEPTION

    name = "mme"
    known = MME_PERCEPTION + MME_COGNITION
    if subtasks is None:
        chosen = [s for s in known if (root / s).is_dir()]
        if not chosen:
            raise missing_data(
                name,
                f"no MME subtask folders ({', '.join(known)}) in {root}; point root at "
                "MME_Benchmark_release_version",
            )
    else:
        chosen = list(subtasks)
        for subtask in chosen:
            if subtask not in known:
                raise PrumergeError(f"{name}: unknown subtask {subtask!r}; known: {known}")
            if not (root / subtask).is_dir():
                raise missing_data(name, f"subtask folder {root / subtask} not found")
    for subtask in chosen:
        folder = root / subtask
        if (folder / "questions_answers_YN").is_dir():
            text_dir, image_dir = folder / "questions_answers_YN", folder / "images"
        else:
            text_dir = image_dir = folder
        text_files = sorted(text_dir.glob("*.txt"))
        if not text_files:
            raise PrumergeError(f"{name}: no question files (*.txt) in {text_dir}")
        for text_file in text_files:
            image = next(
                (
                    image_dir / (text_file.stem + s)
                    for s in _IMAGE_SUFFIXES
                    if (image_dir / (text_file.stem + s)).is_file()
                ),
                None,
            )
            if image is None:
                raise PrumergeError(
                    f"{name}: {text_file}: no image {text_file.stem}.jpg/.png in {image_dir}"
                )
            k = 0
            lines = text_file.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                question, sep, answer = line.rstrip("\r").rpartition("\t")
                if not sep or answer.strip().lower() not in ("yes", "no"):
                    raise PrumergeError(
                        f"{name}: {text_file} line {number}: expected 'question<TAB>Yes' or "
                        "'question<TAB>No'"
                    )
                yield Sample(
                    id=f"{subtask}/{text_file.stem}/{k}",
                    image=image,
                    prompt=with_instruction(question.strip(), SHORT_ANSWER),
                    answers=(answer.strip(),),
                    task=name,
                    subtask=subtask,
                    meta={"image": f"{subtask}/{image.name}", "question": question.strip()},
                )
                k += 1
