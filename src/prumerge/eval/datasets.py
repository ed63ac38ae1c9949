"""Benchmarks by name: what samples they yield and which metric scores them.

A benchmark is a loader registered with :func:`register_benchmark`. :func:`load_benchmark`
calls it and returns a :class:`Benchmark`: the samples, the metric name (a key of
:data:`prumerge.eval.metrics.METRICS`) and the options it was loaded with, which the runner
fingerprints so that results of different data are never mixed.

Loaders for external data read the files that LLaVA's evaluation uses, from a directory the
user points at (``root``); each loader's docstring gives the layout it expects, and every
path can be overridden by an option. Bad input raises :class:`~prumerge.errors.PrumergeError`
naming the file and, for line-oriented files, the line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prumerge.data.easy_vqa import easy_vqa_split, question_type
from prumerge.data.sample import OPTION_ANSWER, SHORT_ANSWER, Sample
from prumerge.errors import PrumergeError
from prumerge.images import load_image

__all__ = [
    "BENCHMARKS",
    "DATA_SOURCES",
    "Benchmark",
    "BenchmarkSpec",
    "ImageFile",
    "Sample",
    "available_benchmarks",
    "get_benchmark",
    "load_benchmark",
    "register_benchmark",
]


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark.

    Attributes:
        name: Registry name.
        metric: Name of the metric in :data:`prumerge.eval.metrics.METRICS`.
        samples: The samples, in a fixed order.
        options: The options it was loaded with (JSON-serialisable), for fingerprints.
    """

    name: str
    metric: str
    samples: list[Sample]
    options: dict[str, Any]

    def __len__(self) -> int:
        return len(self.samples)


Loader = Callable[..., Iterable[Sample]]

#: Where the external benchmarks' files come from (docs/eval.md has the steps). LLaVA's eval
#: bundle is the eval.zip linked from LLaVA's docs/Evaluation.md (haotian-liu/LLaVA).
DATA_SOURCES: dict[str, str] = {
    "vqav2": "questions: llava_vqav2_mscoco_test-dev2015.jsonl in LLaVA's eval.zip (linked "
    "from LLaVA's docs/Evaluation.md); images: COCO test2015, "
    "http://images.cocodataset.org/zips/test2015.zip",
    "textvqa": "llava_textvqa_val_v051_ocr.jsonl in LLaVA's eval.zip (linked from LLaVA's "
    "docs/Evaluation.md); TextVQA_0.5.1_val.json and train_val_images.zip from "
    "https://textvqa.org/dataset (dl.fbaipublicfiles.com/textvqa/)",
    "pope": "coco/coco_pope_{random,popular,adversarial}.json from "
    "https://github.com/AoiDragon/POPE (output/coco); images: COCO val2014, "
    "http://images.cocodataset.org/zips/val2014.zip",
    "mme": "MME_Benchmark_release_version, requested as MME's page says: "
    "https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation",
    "scienceqa-img": "problems.json, pid_splits.json and images/ from data/scienceqa of "
    "https://github.com/lupantech/ScienceQA; llava_test_CQM-A.json in LLaVA's eval.zip",
}


def _missing(benchmark: str, message: str) -> PrumergeError:
    """A not-found error for ``benchmark``'s data that says where to get it."""
    source = DATA_SOURCES.get(benchmark)
    hint = f" (get it: {source}; see docs/eval.md)" if source else ""
    return PrumergeError(f"{benchmark}: {message}{hint}")


#: Benchmark images are shrunk only past this side (no standard benchmark has such images),
#: so that the pixels the processor sees are the file's own, as in LLaVA's evaluation.
BENCHMARK_IMAGE_SIDE = 4096


@dataclass(frozen=True)
class ImageFile:
    """A benchmark image on disk, read by :func:`prumerge.images.load_image` when called.

    Samples carry one instead of a bare path, so that every image is read the robust way:
    16-bit and alpha images are converted, huge ones shrunk past ``BENCHMARK_IMAGE_SIDE``,
    absurd and broken ones refused with a one-line error.
    """

    path: Path

    def __call__(self) -> Any:
        return load_image(self.path, working_size=BENCHMARK_IMAGE_SIDE)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: its loader and metric.

    Attributes:
        name: Registry name.
        metric: Metric name.
        description: One line for listings.
        loader: ``loader(root, **options)`` yielding samples; ``root`` is a Path or, for
            benchmarks that need no files, None.
        needs_root: Whether a data directory is required.
    """

    name: str
    metric: str
    description: str
    loader: Loader
    needs_root: bool


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(
    name: str, *, metric: str, description: str, needs_root: bool = True
) -> Callable[[Loader], Loader]:
    """Register a loader as benchmark ``name``.

    Args:
        name: Registry name (lowercase, dashes).
        metric: Name of the metric that scores it.
        description: One line for listings.
        needs_root: Whether the loader needs a data directory.

    Returns:
        A decorator that registers the loader and returns it unchanged.
    """

    def decorator(loader: Loader) -> Loader:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is already registered")
        BENCHMARKS[name] = BenchmarkSpec(name, metric, description, loader, needs_root)
        return loader

    return decorator


def available_benchmarks() -> list[str]:
    """Names of the registered benchmarks, sorted."""
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> BenchmarkSpec:
    """Look up a registered benchmark.

    Raises:
        PrumergeError: If no benchmark has that name.
    """
    try:
        return BENCHMARKS[name]
    except KeyError:
        known = ", ".join(available_benchmarks())
        raise PrumergeError(f"unknown benchmark {name!r}; known benchmarks: {known}") from None


def load_benchmark(
    name: str, root: str | Path | None = None, *, limit: int | None = None, **options: Any
) -> Benchmark:
    """Load a benchmark's samples.

    Args:
        name: Registry name (see :func:`available_benchmarks`).
        root: Data directory, for benchmarks that read files.
        limit: Keep only the first ``limit`` samples (in the loader's order).
        **options: Loader options (see each loader's docstring).

    Returns:
        The loaded benchmark.

    Raises:
        PrumergeError: Unknown name, missing ``root``, or bad data (with file and line).
    """
    spec = get_benchmark(name)
    if spec.needs_root and root is None:
        raise PrumergeError(f"benchmark {name!r} needs a data directory (root)")
    root_path = Path(root).expanduser() if root is not None else None
    if root_path is not None and not root_path.is_dir():
        raise _missing(name, f"data directory {root_path} does not exist")
    if limit is not None and limit < 0:
        raise PrumergeError(f"limit must be non-negative, got {limit}")
    try:
        samples = list(itertools.islice(spec.loader(root_path, **options), limit))
    except TypeError as exc:
        # An unexpected keyword from the user is an input problem, not a bug.
        if "unexpected keyword" in str(exc):
            raise PrumergeError(f"{name}: {exc}") from None
        raise
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise PrumergeError(f"{name}: duplicate sample id {sample.id!r}")
        seen.add(sample.id)
    samples = [
        dataclasses.replace(s, image=ImageFile(Path(s.image)))
        if isinstance(s.image, (str, Path))
        else s
        for s in samples
    ]
    recorded = {
        key: (str(value) if isinstance(value, Path) else value) for key, value in options.items()
    }
    recorded.update(root=str(root_path) if root_path else None, limit=limit)
    return Benchmark(name=name, metric=spec.metric, samples=samples, options=recorded)


# ---------------------------------------------------------------------------------------------
# File helpers: every error names the file, and the line where there is one.
# ---------------------------------------------------------------------------------------------


def _resolve(root: Path, path: str | Path, what: str, benchmark: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = root / resolved
    if not resolved.exists():
        raise _missing(benchmark, f"{what} {resolved} not found")
    return resolved


def read_jsonl(path: Path, benchmark: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSON-lines file.

    Raises:
        PrumergeError: If a line is not a JSON object; the message names file and line.
    """
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PrumergeError(
                    f"{benchmark}: {path} line {number}: not valid JSON ({exc.msg})"
                ) from None
            if not isinstance(item, dict):
                raise PrumergeError(f"{benchmark}: {path} line {number}: expected a JSON object")
            yield number, item


def read_json(path: Path, benchmark: str) -> Any:
    """Read a JSON file.

    Raises:
        PrumergeError: If it is not valid JSON; the message names file, line and column.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise PrumergeError(
            f"{benchmark}: {path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None


def _field(item: Mapping[str, Any], key: str, where: str, benchmark: str) -> Any:
    if key not in item:
        raise PrumergeError(f"{benchmark}: {where}: missing field {key!r}")
    return item[key]


def _image_dir(root: Path, image_dir: str, benchmark: str, check: bool) -> Path:
    images = Path(image_dir).expanduser()
    images = images if images.is_absolute() else root / images
    if check and not images.is_dir():
        raise _missing(benchmark, f"image directory {images} not found")
    return images


class _ImageChecker:
    """Checks that referenced images exist, stat-ing each distinct file once."""

    def __init__(self, benchmark: str, enabled: bool) -> None:
        self.benchmark = benchmark
        self.enabled = enabled
        self.seen: set[Path] = set()

    def __call__(self, path: Path, where: str) -> Path:
        if self.enabled and path not in self.seen:
            if not path.is_file():
                raise _missing(self.benchmark, f"{where}: image {path} not found")
            self.seen.add(path)
        return path


# ---------------------------------------------------------------------------------------------
# Built-in benchmarks that need no data directory
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# External benchmarks, in the layouts of LLaVA's evaluation (playground/data/eval/<name>)
# ---------------------------------------------------------------------------------------------


def _with_instruction(text: str, instruction: str) -> str:
    """Append LLaVA's answer instruction unless the text already ends with it."""
    return text if text.rstrip().endswith(instruction.strip()) else text + instruction


def _str_field(item: Mapping[str, Any], key: str, where: str, benchmark: str) -> str:
    value = _field(item, key, where, benchmark)
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PrumergeError(f"{benchmark}: {where}: field {key!r} should be a string")
    return str(value)


def _answer_strings(item: Mapping[str, Any], where: str, benchmark: str) -> tuple[str, ...]:
    answers = _field(item, "answers", where, benchmark)
    if not isinstance(answers, list):
        raise PrumergeError(f"{benchmark}: {where}: 'answers' should be a list")
    out = []
    for answer in answers:
        # VQAv2 stores {"answer": ..., "answer_id": ...}; TextVQA stores plain strings.
        text = answer.get("answer") if isinstance(answer, dict) else answer
        if not isinstance(text, str):
            raise PrumergeError(f"{benchmark}: {where}: malformed answer {answer!r}")
        out.append(text)
    return tuple(out)


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
    questions_path = _resolve(root, question_file, "question file", name)
    annotations: dict[str, tuple[tuple[str, ...], str | None]] = {}
    if annotation_file is not None:
        annotation_path = _resolve(root, annotation_file, "annotation file", name)
        payload = read_json(annotation_path, name)
        if not isinstance(payload, dict) or not isinstance(payload.get("annotations"), list):
            raise PrumergeError(f"{name}: {annotation_path}: expected {{'annotations': [...]}}")
        for k, item in enumerate(payload["annotations"]):
            where = f"{annotation_path} annotation {k}"
            qid = _str_field(item, "question_id", where, name)
            annotations[qid] = (_answer_strings(item, where, name), item.get("answer_type"))
    images = _image_dir(root, image_dir, name, check_images)
    check = _ImageChecker(name, check_images)

    def rows() -> Iterator[tuple[str, str, str, str, str | None]]:
        """Yield (where, question id, image file, prompt, category) per question."""
        if questions_path.suffix == ".jsonl":
            for number, item in read_jsonl(questions_path, name):
                where = f"{questions_path} line {number}"
                yield (
                    where,
                    _str_field(item, "question_id", where, name),
                    _str_field(item, "image", where, name),
                    _str_field(item, "text", where, name),
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
            image_id = int(_str_field(item, "image_id", where, name))
            question = _str_field(item, "question", where, name)
            yield (
                where,
                _str_field(item, "question_id", where, name),
                f"{prefix}{image_id:012d}.jpg",
                _with_instruction(question, SHORT_ANSWER),
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
    annotation_path = _resolve(root, annotation_file, "annotation file", name)
    payload = read_json(annotation_path, name)
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise PrumergeError(f"{name}: {annotation_path}: expected {{'data': [...]}}")
    images = _image_dir(root, image_dir, name, check_images)
    check = _ImageChecker(name, check_images)

    entries = []
    for k, item in enumerate(payload["data"]):
        where = f"{annotation_path} entry {k}"
        entries.append(
            (
                where,
                _str_field(item, "question_id", where, name),
                _str_field(item, "image_id", where, name),
                _str_field(item, "question", where, name),
                _answer_strings(item, where, name),
                item,
            )
        )

    if question_file is None:
        for where, qid, image_id, question, answers, item in entries:
            tokens = _field(item, "ocr_tokens", where, name)
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
    questions_path = _resolve(root, question_file, "question file", name)
    for number, item in read_jsonl(questions_path, name):
        where = f"{questions_path} line {number}"
        image_id = _str_field(item, "question_id", where, name)
        prompt = _str_field(item, "text", where, name)
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
    images = _image_dir(root, image_dir, name, check_images)
    check = _ImageChecker(name, check_images)
    for split in splits:
        path = _resolve(root, Path(annotation_dir) / f"coco_pope_{split}.json", "file", name)
        for number, item in read_jsonl(path, name):
            where = f"{path} line {number}"
            label = _str_field(item, "label", where, name).strip().lower()
            if label not in ("yes", "no"):
                raise PrumergeError(f"{name}: {where}: label should be yes or no, got {label!r}")
            text = _str_field(item, "text", where, name)
            yield Sample(
                id=f"{split}-{_str_field(item, 'question_id', where, name)}",
                image=check(images / _str_field(item, "image", where, name), where),
                prompt=_with_instruction(text, SHORT_ANSWER),
                answers=(label,),
                task=name,
                subtask=split,
                meta={"question": text},
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
            raise _missing(
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
                raise _missing(name, f"subtask folder {root / subtask} not found")
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
                    prompt=_with_instruction(question.strip(), SHORT_ANSWER),
                    answers=(answer.strip(),),
                    task=name,
                    subtask=subtask,
                    meta={"image": f"{subtask}/{image.name}", "question": question.strip()},
                )
                k += 1


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
    problems_path = _resolve(root, problems_file, "problems file", name)
    problems = read_json(problems_path, name)
    if not isinstance(problems, dict):
        raise PrumergeError(f"{name}: {problems_path}: expected an object keyed by problem id")
    images = _image_dir(root, image_dir, name, check_images)
    check = _ImageChecker(name, check_images)

    def sample(pid: str, prompt: str, image: Path, where: str) -> Sample:
        if pid not in problems:
            raise PrumergeError(f"{name}: {where}: problem {pid} not in {problems_path}")
        problem = problems[pid]
        where_problem = f"{problems_path} problem {pid}"
        choices = _field(problem, "choices", where_problem, name)
        answer = _field(problem, "answer", where_problem, name)
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
        questions_path = _resolve(root, question_file, "question file", name)
        entries = read_json(questions_path, name)
        if not isinstance(entries, list):
            raise PrumergeError(f"{name}: {questions_path}: expected a list of conversations")
        for k, entry in enumerate(entries):
            where = f"{questions_path} entry {k}"
            if not isinstance(entry, dict):
                raise PrumergeError(f"{name}: {where}: expected an object")
            if "image" not in entry:
                continue  # text-only question: not in the IMG subset
            turns = _field(entry, "conversations", where, name)
            if not isinstance(turns, list) or not turns or "value" not in turns[0]:
                raise PrumergeError(f"{name}: {where}: malformed 'conversations'")
            text = str(turns[0]["value"]).replace("<image>", "").strip()
            yield sample(
                _str_field(entry, "id", where, name),
                text + OPTION_ANSWER,
                images / _str_field(entry, "image", where, name),
                where,
            )
        return

    splits_path = _resolve(root, splits_file, "splits file", name)
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
