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

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from prumerge.errors import PrumergeError

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSpec",
    "Sample",
    "available_benchmarks",
    "get_benchmark",
    "load_benchmark",
    "register_benchmark",
]

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
        raise PrumergeError(f"{name}: data directory {root_path} does not exist")
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
        raise PrumergeError(f"{benchmark}: {what} {resolved} not found")
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


class _ImageChecker:
    """Checks that referenced images exist, stat-ing each distinct file once."""

    def __init__(self, benchmark: str, enabled: bool) -> None:
        self.benchmark = benchmark
        self.enabled = enabled
        self.seen: set[Path] = set()

    def __call__(self, path: Path, where: str) -> Path:
        if self.enabled and path not in self.seen:
            if not path.is_file():
                raise PrumergeError(f"{self.benchmark}: {where}: image {path} not found")
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
    """The generated benchmark (see :mod:`prumerge.eval.synth`).

    Options:
        n_scenes: Number of scenes (10-11 questions each).
        split: "test" (default) or "train".
        seed: Benchmark seed.
        photo_patches: Add scikit-image photo patches as extra objects.
        question_types: Keep only these question types.
    """
    from prumerge.eval import synth

    config = synth.SynthConfig(photo_patches=photo_patches)
    try:
        yield from synth.iter_samples(
            n_scenes, split=split, seed=seed, config=config, question_types=question_types
        )
    except ValueError as exc:
        raise PrumergeError(f"synth: {exc}") from None


_EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


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
    try:
        import easy_vqa
    except ImportError:
        raise PrumergeError(
            "easy-vqa: the easy-vqa package is not installed (pip install easy-vqa)"
        ) from None
    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    elif split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        raise PrumergeError(f"easy-vqa: unknown split {split!r}; choose 'train' or 'test'")
    for index, (question, answer, image_id) in enumerate(
        zip(questions, answers, image_ids, strict=True)
    ):
        if answer in ("yes", "no"):
            subtask = "yes/no"
        elif answer in _EASY_VQA_SHAPES:
            subtask = "shape"
        else:
            subtask = "color"
        yield Sample(
            id=f"easy-vqa-{split}-{index}",
            image=image_paths[image_id],
            prompt=question + SHORT_ANSWER,
            answers=(answer,),
            task="easy-vqa",
            subtask=subtask,
            meta={"question": question, "image_id": image_id},
        )
