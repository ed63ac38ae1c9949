"""The benchmark registry's types: a loaded :class:`Benchmark`, a registered
:class:`BenchmarkSpec`, :func:`register_benchmark`, and the images samples point at."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prumerge.data.sample import Sample
from prumerge.errors import PrumergeError
from prumerge.images import load_image


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


def missing_data(benchmark: str, message: str) -> PrumergeError:
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
